"""SRLDM vs DDRM speed at equal step counts (issue #5: SRLDM >= 8x faster), measured side by side.

Both methods restore the same sr4 measurement of a 256x256 image (random content: speed does not
depend on it) on the same thread count. Timings are interleaved (one DDRM, then one SRLDM run per
repeat, after a warm-up) so that load from other processes hits both alike; medians are reported.
Two ratios are printed:

* per step: the marginal cost of one step, ``(time(S2) - time(S1)) / (S2 - S1)``, the network's share
  (SRLDM's one-off decode and DDRM's one-off SVD set-up cancel out);
* whole restore at ``S2`` steps, decode included.

Each ratio is printed for eager networks and for frozen TorchScript graphs (``priors.frozen``; both
priors frozen alike, graphs traced during the warm-up), each method against DDRM in the same mode.

    PYTHONPATH=src python bench/latent_speed.py --pixel-prior builtin:pixel-s \
        --latent-prior builtin:ldmsr-xs [--steps 10,50] [--repeats 3] [--threads 1] [--modes eager,frozen] [--dtype bf16] \
        [--srldm-options consistency=true]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffrestore.methods import check_options, get_method  # noqa: E402
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
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="network precision of both priors")
    ap.add_argument("--modes", default="eager,frozen", help="network modes to time: eager, frozen or both")
    ap.add_argument("--srldm-options", default="", metavar="NAME=VALUE,...", help="SRLDM options, e.g. consistency=true")
    args = ap.parse_args()
    try:
        pairs = [item.partition("=") for item in args.srldm_options.split(",") if item.strip()]
        options = {"ddrm": {}, "srldm": check_options("srldm", {k.strip(): v.strip() for k, _, v in pairs})}
    except ValueError as e:
        ap.error(f"--srldm-options: {e}")
    modes = args.modes.split(",")
    if not modes or not set(modes) <= {"eager", "frozen"}:
        ap.error(f"--modes {args.modes!r}: choose from eager, frozen")
    s1, s2 = (int(v) for v in args.steps.split(","))
    torch.set_num_threads(args.threads)

    specs = {"ddrm": (args.pixel_prior, "pixel"), "srldm": (args.latent_prior, "latent")}
    priors = {(m, mode): load_prior(spec, kind=kind, dtype=args.dtype).use_frozen_graphs(mode == "frozen")
              for mode in modes for m, (spec, kind) in specs.items()}  # fmt: skip
    task = make_task("sr4", (3, args.size, args.size))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, args.size, args.size, generator=gen) * 2 - 1
    y = task.operator.H(x)

    def run(key: tuple[str, str], steps: int):
        restore = get_method(key[0]).restore
        with torch.no_grad():
            restore(priors[key], task.operator, y, sigma_y=0.0, steps=steps, generator=torch.Generator().manual_seed(1),
                    **options[key[0]])

    for key in priors:  # warm-up (traces the frozen graphs)
        run(key, 2)
    times = {(key, s): [] for key in priors for s in (s1, s2)}
    for _ in range(args.repeats):
        for s in (s1, s2):
            for key in priors:
                times[(key, s)].append(timed(lambda: run(key, s)))
    med = {k: statistics.median(v) for k, v in times.items()}
    per_step = {key: (med[(key, s2)] - med[(key, s1)]) / (s2 - s1) for key in priors}
    print(f"sr4 {args.size}x{args.size}, {args.dtype}, {args.threads} thread(s), median of {args.repeats}; pixel {args.pixel_prior}, "
          f"latent {args.latent_prior}; SRLDM options {options['srldm'] or 'none'}")
    for key in priors:
        print(f"  {key[0]:6s} {key[1]:6s} {s1} steps {med[(key, s1)]:7.3f} s   {s2} steps {med[(key, s2)]:7.3f} s   "
              f"per step {per_step[key] * 1e3:7.1f} ms")
    for mode in modes:
        ddrm, srldm = ("ddrm", mode), ("srldm", mode)
        print(f"  {mode}: SRLDM speed-up per step {per_step[ddrm] / per_step[srldm]:.1f}x; "
              f"whole restore at {s2} steps {med[(ddrm, s2)] / med[(srldm, s2)]:.1f}x")


if __name__ == "__main__":
    main()
