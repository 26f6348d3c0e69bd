"""Network GFLOP/s of the built-in priors' UNets on the CPU, default (contiguous) vs channels-last memory format,
fp32 and bf16, against a large-conv peak measured in the same run.

One forward per variant is counted with ``FlopCounterMode`` (2 FLOP per multiply-add) and timed in CPU time
(best of ``--repeats`` after a warm-up). channels-last converts the weights and the input once; oneDNN then
skips its per-call layout conversions.

    PYTHONPATH=src python bench/network_formats.py [--size 256] [--repeats 3] [--threads 1] [--priors adm256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scaling import DTYPES, conv_peak, cpu_seconds  # noqa: E402

from diffrestore.priors.loading import load_prior  # noqa: E402


def inputs(prior, size: int, dtype: torch.dtype):
    """(module, args) of one UNet call at image side ``size``."""
    side = size // prior.downscale if hasattr(prior, "encode") else size
    x = torch.randn(1, prior.unet.config.in_channels, side, side, dtype=dtype)
    return prior.unet, (x, torch.tensor([500.0]))


def make_prior(spec: str, dtype):
    if spec != "adm256":
        return load_prior(spec, dtype=dtype)
    from diffrestore.priors.adm import adm_config, build_adm_unet
    from diffrestore.priors.pixel import UNetPixelPrior

    torch.manual_seed(0)
    return UNetPixelPrior(build_adm_unet(adm_config()), dtype=dtype)


def gflops(module, args, repeats: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            module(*args)
        module(*args)
        best = float("inf")
        for _ in range(repeats):
            t0 = sum(cpu_seconds())
            module(*args)
            best = min(best, sum(cpu_seconds()) - t0)
    return counter.get_total_flops() / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--priors", default="builtin:pixel-s,builtin:ldmsr-xs",
                    help="prior specs; adm256: the full 256x256 unconditional ADM with random weights")
    ap.add_argument("--size", type=int, default=256, help="image side (a latent prior's UNet runs at size / downscale)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'prior':18s} {'dtype':5s} {'format':13s} {'GFLOP/s':>8s} {'% of conv peak':>14s}")
    for name, dtype in DTYPES.items():
        peak = conv_peak(dtype)
        print(f"{'conv peak':18s} {name:5s} {'':13s} {peak:8.1f}")
        for spec in args.priors.split(","):
            prior = make_prior(spec, None if name == "fp32" else dtype)
            module, call = inputs(prior, args.size, dtype)
            for fmt in ("contiguous", "channels_last"):
                if fmt == "channels_last":
                    module = module.to(memory_format=torch.channels_last)
                    call = (call[0].contiguous(memory_format=torch.channels_last), call[1])
                rate = gflops(module, call, args.repeats)
                print(f"{spec:18s} {name:5s} {fmt:13s} {rate:8.1f} {100 * rate / peak:14.1f}", flush=True)


if __name__ == "__main__":
    main()
