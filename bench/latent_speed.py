"""SRLDM vs DDRM speed at equal step counts (issue #5: SRLDM >= 8x faster), measured side by side.

Both methods restore the same sr4 measurement of a 256x256 image (random content: speed does not
depend on it) on the same thread count. Timings are interleaved (one DDRM, then one SRLDM run per
repeat, after a warm-up) so that load from other processes hits both alike; medians are reported.
Two ratios are printed:

* per step: the marginal cost of one step, ``(time(S2) - time(S1)) / (S2 - S1)``, the network's share
  (SRLDM's one-off decode and DDRM's one-off SVD set-up cancel out);
* whole restore at ``S2`` steps, decode included.

    PYTHONPATH=src python bench/latent_speed.py --pixel-prior builtin:pixel-s \
        --latent-prior builtin:ldmsr-xs [--steps 10,50] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffrestore.methods import get_method  # noqa: E402
from diffrestore.operators.tasks import make_task  # noqa: E402
from diffrestore.priors.loading import load_prior  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pixel-prior", default="builtin:pixel-s")
    ap.add_argument("--latent-prior", default="builtin:ldmsr-s")
    ap.add_argument("--steps", default="10,50", help="two step counts S1,S2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    s1, s2 = (int(v) for v in args.steps.split(","))
    torch.set_num_threads(args.threads)

    priors = {"ddrm": load_prior(args.pixel_prior, kind="pixel"), "srldm": load_prior(args.latent_prior, kind="latent")}
    task = make_task("sr4", (3, args.size, args.size))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, args.size, args.size, generator=gen) * 2 - 1
    y = task.operator.H(x)

    def run(name: str, steps: int):
        restore = get_method(name).restore
        with torch.no_grad():
            restore(priors[name], task.operator, y, sigma_y=0.0, steps=steps, generator=torch.Generator().manual_seed(1))

    for name in priors:  # warm-up
        run(name, 2)
    times = {(m, s): [] for m in priors for s in (s1, s2)}
    for _ in range(args.repeats):
        for s in (s1, s2):
            for m in priors:
                times[(m, s)].append(timed(lambda: run(m, s)))
    med = {k: statistics.median(v) for k, v in times.items()}
    per_step = {m: (med[(m, s2)] - med[(m, s1)]) / (s2 - s1) for m in priors}
    print(f"sr4 {args.size}x{args.size}, {args.threads} thread(s), median of {args.repeats}; pixel {args.pixel_prior}, "
          f"latent {args.latent_prior}")
    for m in priors:
        print(f"  {m:6s} {s1} steps {med[(m, s1)]:7.3f} s   {s2} steps {med[(m, s2)]:7.3f} s   per step {per_step[m] * 1e3:7.1f} ms")
    print(f"  SRLDM speed-up per step: {per_step['ddrm'] / per_step['srldm']:.1f}x; "
          f"whole restore at {s2} steps: {med[('ddrm', s2)] / med[('srldm', s2)]:.1f}x")


if __name__ == "__main__":
    main()
