"""DDRM overhead: wall time of ``ddrm.restore`` divided by (number of steps x one network forward).

A ratio of 1.00 means the sampler costs nothing beyond the network; the target is <= 1.05.
The network is a small diffusers ``UNet2DModel`` with random weights; the operator a real one from
``diffrestore.operators`` (``--task``; identity when the task registry is unavailable). Network-only
and DDRM timings are interleaved (one pair per repeat, after a warm-up) so that load from other
processes hits both alike; the reported ratio is the median of the per-pair ratios.

    PYTHONPATH=src python bench/overhead.py [--size 256] [--steps 20] [--task sr4] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffrestore.methods import ddrm  # noqa: E402
from diffrestore.methods.common import uniform_skip_timesteps  # noqa: E402
from diffrestore.priors.base import PixelPrior, alphas_cumprod_from_betas, linear_betas  # noqa: E402


class CachedPrior(PixelPrior):
    """Returns a fixed eps at no cost: DDRM with it times the sampler alone."""

    def __init__(self, eps):
        super().__init__(alphas_cumprod_from_betas(linear_betas()))
        self._eps = eps

    def eps(self, x_t, t):
        return self._eps


class UNetPrior(PixelPrior):
    def __init__(self, size: int):
        super().__init__(alphas_cumprod_from_betas(linear_betas()))
        from diffusers import UNet2DModel

        torch.manual_seed(0)
        self.net = UNet2DModel(
            sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(32, 64, 64, 128),
            down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
            norm_num_groups=32,
        ).eval()

    def eps(self, x_t, t):
        return self.net(x_t, t).sample


def make_operator(task: str, size: int):
    shape = (3, size, size)
    try:
        from diffrestore.operators.tasks import make_task

        t = make_task(task, shape)
        return t.operator, t.sigma_y, task
    except Exception as e:  # registry not available: fall back to the identity
        print(f"(task {task!r} unavailable: {e!r}; using the identity)", file=sys.stderr)
        from diffrestore.operators.denoise import Identity

        return Identity(shape), 0.1, "identity"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--task", default="sr4", help="task name from diffrestore.operators.tasks (default sr4)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    prior = UNetPrior(args.size).to(device)
    op, sigma_y, task = make_operator(args.task, args.size)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1)
    y = op.measure(x, sigma_y, generator=g).to(device)
    ts = uniform_skip_timesteps(prior.num_timesteps, args.steps)[::-1]
    n_eval = len(ts)
    x_net = torch.randn(1, 3, args.size, args.size, generator=g).to(device)

    def timed(run) -> float:
        """Wall time of ``run()`` (synchronised on CUDA), without autograd."""
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            run()
        sync(device)
        return time.perf_counter() - t0

    def forwards() -> None:
        for t in ts:
            prior.eps(x_net, torch.full((1,), float(t), device=device))

    def ddrm_with(p) -> float:
        gen = torch.Generator().manual_seed(1)
        return timed(lambda: ddrm.restore(p, op, y, sigma_y=sigma_y, steps=args.steps, generator=gen))

    with torch.no_grad():
        cached = CachedPrior(prior.eps(x_net, torch.full((1,), 500.0, device=device)))

    # warm-up: one forward and one short DDRM run
    with torch.no_grad():
        prior.eps(x_net, torch.zeros(1, device=device))
    ddrm.restore(prior, op, y, sigma_y=sigma_y, steps=2, generator=torch.Generator().manual_seed(1))

    ratios, nets, samps, alone = [], [], [], []
    for _ in range(args.repeats):
        tn, ts_ = timed(forwards), ddrm_with(prior)
        alone.append(ddrm_with(cached))
        nets.append(tn / n_eval)
        samps.append(ts_)
        ratios.append(ts_ / tn)
    fwd = statistics.median(nets)
    t_alone = statistics.median(alone)
    print(
        f"ddrm overhead  size={args.size} steps={args.steps} ({n_eval} evaluations) task={task} "
        f"device={device} threads={torch.get_num_threads()}"
    )
    print(f"  one forward (median) {fwd * 1e3:.1f} ms; ddrm run (median) {statistics.median(samps):.3f} s")
    print(f"  ratio ddrm / (steps x forward): median {statistics.median(ratios):.3f} "
          f"(per repeat: {', '.join(f'{r:.3f}' for r in ratios)}; target <= 1.05)")
    print(f"  sampler alone (network replaced by a cached eps): {t_alone * 1e3:.1f} ms per run "
          f"-> ratio 1 + alone / (steps x forward) = {1 + t_alone / (n_eval * fwd):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
