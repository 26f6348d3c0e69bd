"""Per-step cost of ΠGDM and RED-diff relative to DDRM, timed side by side (interleaved rounds, the
fastest round of each method kept, so load from other processes affects all three alike).

ΠGDM runs the network forward and backward each step (the VJP), RED-diff one forward plus an operator
round trip, DDRM one forward.

    PYTHONPATH=src python bench/pigdm_reddiff_step_cost.py --prior builtin:pixel-s --size 256 --steps 5 --rounds 3
"""

from __future__ import annotations

import argparse
import time

import torch

from diffrestore.methods import get_method
from diffrestore.operators.tasks import make_task
from diffrestore.priors.loading import load_prior


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prior", default="builtin:pixel-s")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--task", default="noisy-sr4")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default="ddrm,pigdm,reddiff")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prior = load_prior(args.prior, kind="pixel")
    task = make_task(args.task, (3, args.size, args.size))
    x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = task.measure(x, generator=torch.Generator().manual_seed(1))
    methods = args.methods.split(",")
    best = {m: float("inf") for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            start = time.perf_counter()
            get_method(m).restore(prior, task.operator, y, sigma_y=task.sigma_y, steps=args.steps,
                                  generator=torch.Generator().manual_seed(0))
            best[m] = min(best[m], (time.perf_counter() - start) / args.steps)
    base = best.get("ddrm", next(iter(best.values())))
    for m in methods:
        print(f"{m:8s} {best[m]:.3f} s/step  {best[m] / base:.2f}x ddrm")


if __name__ == "__main__":
    main()
