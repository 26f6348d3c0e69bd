"""Per-step cost of every registered pixel-prior method as a ratio to DDRM's, measured side by side.

Every method whose registry entry (``diffrestore.methods.METHODS``) has prior ``"pixel"`` restores
the same measurement (a real photo, or a smooth random image without ``../shared``) with the same
prior, task, step count and seed. After one warm-up call per method, each repeat runs every
method once, in turn (interleaved, so that load from other processes hits all alike); a method's
per-step cost in a repeat is its wall time (``restoration.run_method``: the method call alone, setup
of its operator quantities included) over the step count, and its ratio is that over DDRM's in the
same repeat. The table shows the medians over repeats. A method that fails is listed with its error.

    PYTHONPATH=src python bench/solver_speed.py [--prior builtin:pixel-s] [--size 256] [--task sr4]
        [--steps 4] [--repeats 5] [--device cpu] [--dtype fp32] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from diffrestore.methods import METHODS  # noqa: E402
from diffrestore.operators.tasks import make_task  # noqa: E402
from diffrestore.restoration import measure_image, run_method  # noqa: E402
from diffrestore.priors.loading import load_prior  # noqa: E402

REFERENCE = "ddrm"
PHOTOS = ROOT.parent / "shared" / "data" / "imagenet-sample-500"


def bench_image(size: int) -> tuple[torch.Tensor, str]:
    """(1, 3, size, size) in [-1, 1]: the first photo of imagenet-sample-500, else a smooth random image."""
    photos = sorted(PHOTOS.glob("*.JPEG")) if PHOTOS.is_dir() else []
    if photos:
        from diffrestore.evaluation.data import load_eval_image

        return load_eval_image(photos[0], size).unsqueeze(0), photos[0].name
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, size // 8, size // 8, generator=g), size=(size, size), mode="bilinear")
    return x * 2 - 1, "random"


def pixel_methods() -> list[str]:
    """The registry's pixel-prior methods, DDRM first."""
    names = [name for name, info in METHODS.items() if info.prior == "pixel"]
    return sorted(names, key=lambda n: n != REFERENCE)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", default="builtin:pixel-s")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--task", default="sr4")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    methods = pixel_methods()
    if REFERENCE not in methods:
        print(f"{REFERENCE} is not registered as a pixel method; nothing to compare against", file=sys.stderr)
        return 2
    prior = load_prior(a.prior, device=a.device, dtype=a.dtype, kind="pixel")
    task = make_task(a.task, (3, a.size, a.size))
    x, image_id = bench_image(a.size)
    y = measure_image(task, x, 0, image_id).to(a.device)
    priors = {"pixel": prior}

    def timed(method: str, steps: int) -> float:
        return run_method(method, priors, task, y, steps=steps, seed=0).seconds

    errors: dict[str, str] = {}
    for m in methods:  # warm-up (first-call allocations, lazy operator set-up)
        try:
            timed(m, min(a.steps, 2))
        except Exception as e:  # noqa: BLE001 - a broken method is reported, the others still measured
            errors[m] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if m == REFERENCE:
                print(f"{REFERENCE} failed: {errors[m]}", file=sys.stderr)
                return 1
    live = [m for m in methods if m not in errors]
    per_step: dict[str, list[float]] = {m: [] for m in live}
    ratios: dict[str, list[float]] = {m: [] for m in live}
    for r in range(a.repeats):
        order = live if r % 2 == 0 else live[::-1]  # alternate the order: no method always runs first
        this = {m: timed(m, a.steps) / a.steps for m in order}
        for m in live:
            per_step[m].append(this[m])
            ratios[m].append(this[m] / this[REFERENCE])
    print(f"# per-step cost vs {REFERENCE.upper()}: prior {a.prior}, {a.task}, {a.size}x{a.size}, {a.steps} steps, "
          f"{a.repeats} interleaved repeats (medians), device {a.device}, dtype {a.dtype}, threads {torch.get_num_threads()}, "
          f"image {image_id}")  # fmt: skip
    print(f"{'method':12s} {'s/step':>9s} {'ratio':>7s} {'ratio range':>15s}")
    for m in live:
        lo, hi = min(ratios[m]), max(ratios[m])
        print(f"{m:12s} {statistics.median(per_step[m]):9.4f} {statistics.median(ratios[m]):7.3f} {f'{lo:.3f}-{hi:.3f}':>15s}")
    for m, e in errors.items():
        print(f"{m:12s} failed: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
