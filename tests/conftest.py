from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GOLDEN = SHARED / "golden"
DATA = SHARED / "data"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED}")
    return SHARED


# Tiny models run faster single-threaded on the 2-core CI machine (thread hand-off dominates).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def frozen_traces(monkeypatch) -> list:
    """Every graph ``priors.frozen`` traces in the test, as (module class name, number of inputs)."""
    from diffrestore.priors.frozen import FrozenGraphs

    traces = []
    freeze = FrozenGraphs._freeze

    def recording_freeze(self, inputs):
        traces.append((type(self.module).__name__, len(inputs)))
        return freeze(self, inputs)

    monkeypatch.setattr(FrozenGraphs, "_freeze", recording_freeze)
    return traces
