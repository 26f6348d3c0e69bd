"""CPU cost per megapixel-step at growing image sizes, its system-time share, and network GFLOP/s against
a conv peak measured in the same run.

Each (method, size, allocator mode) runs in its own child process (so the C allocator setting of
``diffrestore.runtime`` can be on or off, ``DIFFRESTORE_MALLOC=system``, and resource usage is its own):
after a one-step warm-up, an sr4 restore of a random image with ``S1`` and then ``S2`` steps; the marginal CPU time (user + sys)
per step, ``(cpu(S2) - cpu(S1)) / (S2 - S1)``, divided by the image's megapixels is the figure of merit
(the network's and the sampler's per-step cost; a one-off SVD set-up or decode cancels out). The child
also records minor page faults per step, peak resident memory, and times one network call (its
multiply-adds counted by ``torch.utils.flop_counter.FlopCounterMode``) for GFLOP/s (2 FLOP per MAC).
The conv peak is the best of a few calls of a large 3x3 conv2d (512 -> 512 channels, 64x64) per dtype.

    PYTHONPATH=src python bench/scaling.py [--sizes 256,512,1024,2048] [--methods ddrm,ddrm-ldm] \
        [--modes off,on] [--steps 1,3] [--threads 1] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

PRIORS = {"ddrm": ("builtin:pixel-s", "pixel"), "ddrm-ldm": ("builtin:ldmsr-xs", "latent")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_seconds() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def conv_peak(dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOP/s of a large 3x3 convolution (best of ``repeats`` calls, CPU time), the CPU's practical peak."""
    conv = torch.nn.Conv2d(512, 512, 3, padding=1).to(dtype).eval()
    x = torch.randn(1, 512, 64, 64, dtype=dtype)
    flops = 2 * 512 * 512 * 9 * 64 * 64
    best = float("inf")
    with torch.no_grad():
        conv(x)
        for _ in range(repeats):
            t0 = sum(cpu_seconds())
            conv(x)
            best = min(best, sum(cpu_seconds()) - t0)
    return flops / best / 1e9


def child(cfg: dict) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from diffrestore import runtime
    from diffrestore.operators.tasks import make_task
    from diffrestore.restoration import run_method
    from diffrestore.priors.loading import load_prior

    torch.set_num_threads(cfg["threads"])
    spec, kind = PRIORS[cfg["method"]]
    prior = load_prior(spec, kind=kind, dtype=cfg["dtype"])
    size = cfg["size"]
    task = make_task("sr4", (3, size, size))
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = task.operator.H(x)
    calls = []
    eps = prior.eps

    def recording_eps(*args):
        if not calls:
            calls.append(args)
        return eps(*args)

    prior.eps = recording_eps
    out = {"allocator_tuned": runtime.allocator_tuned()}
    with torch.no_grad():
        usage = {}
        run_method(cfg["method"], {kind: prior}, task, y, steps=1, seed=1)  # warm-up: one-off set-up costs
        for steps in cfg["steps"]:
            r0, (u0, s0) = resource.getrusage(resource.RUSAGE_SELF), cpu_seconds()
            run_method(cfg["method"], {kind: prior}, task, y, steps=steps, seed=1)
            r1, (u1, s1) = resource.getrusage(resource.RUSAGE_SELF), cpu_seconds()
            usage[steps] = (u1 - u0, s1 - s0, r1.ru_minflt - r0.ru_minflt)
        prior.eps = eps
        with FlopCounterMode(display=False) as counter:
            eps(*calls[0])
        t0 = sum(cpu_seconds())
        eps(*calls[0])
        net_cpu = sum(cpu_seconds()) - t0
    (a, (ua, sa, fa)), (b, (ub, sb, fb)) = sorted(usage.items())
    mp = size * size / 1e6
    user, sys_ = (ub - ua) / (b - a), (sb - sa) / (b - a)
    out.update(
        cpu_per_mp_step=(user + sys_) / mp, sys_share=sys_ / max(user + sys_, 1e-9), minflt_per_step=(fb - fa) / (b - a),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        net_gflops=counter.get_total_flops() / net_cpu / 1e9, net_cpu_s=net_cpu,
    )  # fmt: skip
    return out


def run_child(cfg: dict, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.pop("MALLOC_MMAP_MAX_", None), env.pop("MALLOC_TRIM_THRESHOLD_", None)
    if mode == "off":
        env["DIFFRESTORE_MALLOC"] = "system"
    else:
        env.pop("DIFFRESTORE_MALLOC", None)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"child {cfg} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256,512,1024,2048", help="image sides (0.07, 0.26, 1.05, 4.2 MP)")
    ap.add_argument("--methods", default="ddrm,ddrm-ldm")
    ap.add_argument("--modes", default="off,on", help="allocator setting: off (glibc defaults), on (diffrestore's)")
    ap.add_argument("--steps", default="1,3", help="two step counts S1,S2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    torch.set_num_threads(args.threads)
    peak = conv_peak(DTYPES[args.dtype])
    print(f"conv peak ({args.dtype}, {args.threads} thread(s)): {peak:.1f} GFLOP/s; sr4, steps {args.steps}")
    head = f"{'method':9s} {'MP':>5s} {'alloc':5s} {'CPU s/MP-step':>13s} {'sys %':>6s} {'minflt/step':>11s} {'peak MiB':>9s} {'net GFLOP/s':>11s} {'% peak':>6s}"
    print(head)
    rows = []
    for method in args.methods.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            by_mode = {}
            for mode in args.modes.split(","):
                cfg = {"method": method, "size": size, "steps": [int(s) for s in args.steps.split(",")],
                       "threads": args.threads, "dtype": args.dtype}  # fmt: skip
                t0 = time.perf_counter()
                r = by_mode[mode] = {**cfg, "mode": mode, **run_child(cfg, mode), "wall_s": time.perf_counter() - t0}
                rows.append(r)
                print(f"{method:9s} {size * size / 1e6:5.2f} {mode:5s} {r['cpu_per_mp_step']:13.2f} {100 * r['sys_share']:6.1f} "
                      f"{r['minflt_per_step']:11.0f} {r['peak_rss_mib']:9.0f} {r['net_gflops']:11.1f} {100 * r['net_gflops'] / peak:6.1f}",
                      flush=True)  # fmt: skip
            if {"on", "off"} <= set(by_mode):
                on, off = by_mode["on"], by_mode["off"]
                print(f"{'':9s} {'':5s} on/off: CPU per MP-step {on['cpu_per_mp_step'] / off['cpu_per_mp_step']:.2f}x, "
                      f"peak memory {on['peak_rss_mib'] / off['peak_rss_mib']:.2f}x", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"conv_peak_gflops": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
