"""evaluate's --dtype: "auto" (the default) is resolved on the run's device and recorded as the precision
that ran; the paper preset stays in fp32; fp16 on a CPU warns."""

from __future__ import annotations

import pytest

import test_runner_fakes as fx
from diffrestore import runtime
from diffrestore.evaluation import plan


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fx.make_data(tmp_path_factory.mktemp("data"))


def _settings(data, tmp_path, **spec):
    base = dict(out=str(tmp_path / "run"), data=str(data), n=2, tasks=["sr4"], methods=["ddrm"], pixel_prior="builtin:pixel-s")
    return plan.prepare(plan.EvalSpec(**{**base, **spec})).settings


@pytest.mark.parametrize("native", ["bf16", "fp32"])
def test_auto_is_recorded_as_the_precision_it_picks(data, tmp_path, monkeypatch, native):
    monkeypatch.setattr(runtime, "auto_dtype", lambda device: native)
    assert _settings(data, tmp_path)["dtype"] == native
    assert _settings(data, tmp_path, dtype="auto")["dtype"] == native
    assert _settings(data, tmp_path, dtype="fp32")["dtype"] == "fp32"


def test_paper_preset_runs_in_fp32(data, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "auto_dtype", lambda device: "bf16")
    assert _settings(data, tmp_path, preset="paper", n=None)["dtype"] == "fp32"
    assert _settings(data, tmp_path, preset="paper", n=None, dtype="bf16")["dtype"] == "bf16"


def test_fp16_on_cpu_warns(data, tmp_path, capsys):
    assert _settings(data, tmp_path, dtype="fp16")["dtype"] == "fp16"
    assert capsys.readouterr().err.count("diffrestore: warning: fp16 on a CPU") == 1
