"""DiffPIR on a few real photos: its default against the official behaviours it keeps behind options
(``official_output``: return the t = 0 state; ``init="noise-matched"``: the deblur script's start), and
its per-step cost side by side with DDRM's (same prior, task, photo, steps; best of ``--repeats``).

    PYTHONPATH=src python bench/diffpir_notes.py --prior builtin:pixel-s --first 4 --steps 20
"""

from __future__ import annotations

import argparse
import time

import torch

from diffrestore.evaluation.data import find_images, load_eval_image
from diffrestore.metrics.quality import psnr, ssim
from diffrestore.methods import get_method
from diffrestore.operators.tasks import make_task
from diffrestore.restoration import make_generator, measure_image
from diffrestore.priors.loading import load_prior

VARIANTS = {"default": {}, "official_output": {"official_output": True}, "init=noise-matched": {"init": "noise-matched"}}
TASKS = ["sr4", "deblur", "denoise", "noisy-sr4"]


class _NoNetwork(torch.nn.Module):
    """A prior whose network costs nothing: what is left of a step is the sampler's own work."""

    def __init__(self, prior):
        super().__init__()
        self.alphas_cumprod, self.num_timesteps = prior.alphas_cumprod, prior.num_timesteps

    def eps(self, x, t):
        return torch.zeros_like(x)


def quality(prior, paths, steps, seed):
    print("| task | variant | PSNR (dB) | SSIM |\n|:--|:--|--:|--:|")
    for name in TASKS:
        for label, opts in VARIANTS.items():
            p = s = 0.0
            for path in paths:
                x = load_eval_image(path)[None]
                task = make_task(name, x.shape[1:])
                y = measure_image(task, x, seed, path.stem)
                out = get_method("diffpir").restore(prior, task.operator, y, sigma_y=task.sigma_y, steps=steps,
                                                    generator=make_generator(seed), **opts)
                p += float(psnr(out, x)[0]) / len(paths)
                s += float(ssim(out, x)[0]) / len(paths)
            print(f"| {name} | {label} | {p:.2f} | {s:.4f} |", flush=True)


def timing(prior, path, steps, seed, repeats):
    x = load_eval_image(path)[None]
    print("| task | prior | DDRM s/step | DiffPIR s/step | ratio |\n|:--|:--|--:|--:|--:|")
    for name in ("sr4", "deblur"):
        task = make_task(name, x.shape[1:])
        y = measure_image(task, x, seed, path.stem)
        for label, p in (("pixel-s", prior), ("no network", _NoNetwork(prior))):
            best = {"ddrm": float("inf"), "diffpir": float("inf")}
            for _ in range(repeats):  # interleaved, so both see the same machine load
                for method in best:
                    start = time.perf_counter()
                    get_method(method).restore(p, task.operator, y, sigma_y=task.sigma_y, steps=steps,
                                               generator=make_generator(seed))
                    best[method] = min(best[method], (time.perf_counter() - start) / steps)
            print(f"| {name} | {label} | {best['ddrm']:.4f} | {best['diffpir']:.4f} | "
                  f"{best['diffpir'] / best['ddrm']:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", default="builtin:pixel-s")
    ap.add_argument("--data", default="../shared/data/imagenet-sample-500")
    ap.add_argument("--first", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prior = load_prior(args.prior, device="cpu", dtype="fp32", kind="pixel")
    paths = find_images(args.data)[: args.first]
    with torch.no_grad():
        if not args.skip_quality:
            quality(prior, paths, args.steps, args.seed)
        timing(prior, paths[0], args.steps, args.seed, args.repeats)


if __name__ == "__main__":
    main()
