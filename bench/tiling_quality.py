"""Tiled against untiled restoration quality: DDRM on the first N photos of a folder, two tasks.

Each photo is centre-cropped and resized as ``evaluate --size`` does (``load_eval_image``), degraded with
the evaluation's seeded measurement, and restored twice with the same seed: the whole image through the
network (``tile=0``) and on blended, shifting tiles (``--tile``/``--overlap``). Printed per task: mean
PSNR and LPIPS (when its weights are installed) of both, and the mean and largest per-photo difference.

    PYTHONPATH=src python bench/tiling_quality.py [--n 20] [--size 512] [--tile 256] [--overlap 32] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffrestore.metrics import quality as metrics  # noqa: E402
from diffrestore.metrics.lpips import LPIPSUnavailable, lpips  # noqa: E402
from diffrestore.evaluation.data import choose_subset, find_images, load_eval_image  # noqa: E402
from diffrestore.operators.tasks import make_task  # noqa: E402
from diffrestore.restoration import image_seed, measure_image, run_method  # noqa: E402
from diffrestore.priors.loading import load_prior  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-500"


def lpips_or_none(x_hat: torch.Tensor, x: torch.Tensor) -> float | None:
    try:
        return float(lpips(x_hat, x)[0])
    except LPIPSUnavailable:  # weights not installed: PSNR only
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--tasks", default="denoise,sr4")
    p.add_argument("--prior", default="builtin:pixel-s")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    prior = load_prior(args.prior)
    files = choose_subset(find_images(args.data), args.n, args.seed, first=True)
    print(f"DDRM {args.steps} steps, {args.prior}, {len(files)} photos at {args.size}, tile {args.tile} overlap {args.overlap}")
    for task_name in args.tasks.split(","):
        task = make_task(task_name, (3, args.size, args.size))
        rows = []
        for f in files:
            x = load_eval_image(f, args.size).unsqueeze(0)
            y = measure_image(task, x, args.seed, f.name)
            row = []
            for tile in (0, args.tile):
                run = run_method("ddrm", {"pixel": prior}, task, y, steps=args.steps, seed=image_seed(args.seed, f.name),
                                 tile=tile, overlap=args.overlap)  # fmt: skip
                x_hat = run.x_hat.clamp(-1, 1)
                row += [float(metrics.psnr(x_hat, x)[0]), lpips_or_none(x_hat, x)]
            rows.append(row)
            print(f"  {task_name} {f.name}: PSNR {row[0]:.2f} / {row[2]:.2f} tiled, LPIPS {row[1]} / {row[3]}", flush=True)
        for k, name in ((0, "PSNR"), (1, "LPIPS")):
            if rows[0][k] is None:
                continue
            d = torch.tensor([r[k + 2] - r[k] for r in rows], dtype=torch.float64)
            mean = lambda j: sum(r[j] for r in rows) / len(rows)  # noqa: E731
            print(f"{task_name:8s} {name}: untiled {mean(k):.4f}, tiled {mean(k + 2):.4f}, tiled - untiled mean "
                  f"{float(d.mean()):+.4f}, largest |diff| {float(d.abs().max()):.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
