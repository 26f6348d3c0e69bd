"""One command for a GPU machine: correctness against the golden tensors on the device, then speed at full size.

Needs nothing but this repository (and PyTorch with CUDA): it makes the package importable
(``pip install -e .`` without network when it is not yet installed), then

1. golden: the CPU golden tests (pytest, DDRM and LDM), and on the device in fp32 (TF32 off) the golden
   tiny ADM's 20 recorded network calls and the golden tiny LDM-SR's UNet and first stage against the
   official outputs (relative L2 <= 1e-4);
2. speed: DDRM with a full-size ADM-256 (the 256x256 unconditional architecture, 552.8M parameters, random
   weights) at 20 and 100 steps and SRLDM with a full-size LDM-SR (the CompVis 4x config, random weights)
   at 100 steps, sr4 on 256x256 images, batch 1 and 16, bf16 and fp16, eager and ``torch.compile``d UNets;
   rows that would overrun the time budget are listed as skipped, so the whole run stays under 8 minutes;
3. a 2-rank ``torchrun`` evaluation on the device (the evaluation's control path is gloo by design) and a
   2-rank NCCL all-reduce (needs a GPU per rank; skipped with its reason on a one-GPU machine).

It prints one table and writes everything to a JSON file. ``--dry-run`` runs the same code on the CPU at
tiny sizes (tiny networks, 1-2 steps, batch 1-2, gloo) in well under a minute: the CI check of this script.

    python bench/device_check.py [--json device_check.json] [--budget-s 330] [--dry-run]
    bench/device_check.sh   # the same, JSON next to the table in device_check.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "golden"
SRC = str(ROOT / "src")

# the CompVis LDM-SR 4x networks (hub configs of CompVis/ldm-super-resolution-4x-openimages); dry run: tiny
LDM_UNET = dict(in_channels=6, out_channels=3, layers_per_block=2, block_out_channels=(160, 320, 320, 640),
                down_block_types=("DownBlock2D",) * 3 + ("AttnDownBlock2D",),
                up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * 3, attention_head_dim=32)  # fmt: skip
LDM_VQ = dict(in_channels=3, out_channels=3, latent_channels=3, layers_per_block=2, block_out_channels=(128, 256, 512),
              down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
              num_vq_embeddings=8192)  # fmt: skip
TINY_LDM_UNET = {**LDM_UNET, "layers_per_block": 1, "block_out_channels": (32, 32, 32, 64), "attention_head_dim": 16}
TINY_LDM_VQ = {**LDM_VQ, "layers_per_block": 1, "block_out_channels": (32, 32, 64), "num_vq_embeddings": 64}
TINY_ADM = dict(image_size=64, num_channels=32, num_res_blocks=1, attention_resolutions="16", num_head_channels=16)


def ensure_importable() -> str:
    """Import diffrestore from this checkout: as installed, else ``pip install -e .`` now (no network: no deps),
    and src/ on sys.path whatever pip says (the children get it on PYTHONPATH)."""
    spec = importlib.util.find_spec("diffrestore")
    if spec is not None and spec.origin and Path(spec.origin).resolve().is_relative_to(ROOT):
        how = "diffrestore from this checkout"
    else:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", str(ROOT)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        how = "pip install -e ." if proc.returncode == 0 else f"src/ on sys.path (pip install failed: {proc.stderr.strip()[-200:]})"
    if SRC not in sys.path:
        sys.path.insert(0, SRC)
    return how


def child_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))


def rel_l2(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------
# 1. golden


def golden_pytest(dry: bool) -> dict:
    if dry:
        return {"check": "golden pytest (CPU)", "ok": None, "detail": "skipped in the dry run"}
    tests = ["tests/methods/test_ddrm_golden.py", "tests/priors/test_ldm.py", "tests/priors/test_adm.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True)  # fmt: skip
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    return {"check": "golden pytest (CPU)", "ok": proc.returncode == 0, "detail": last}


def golden_on_device(device: str) -> list[dict]:
    """Our networks on ``device`` in fp32 against the official outputs recorded on a CPU."""
    import torch

    from diffrestore.priors.loading import load_prior

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = []
    adm = load_prior(GOLDEN / "ddrm" / "unet_state_dict.pt", device=device, adm_config={"num_head_channels": 16})
    calls = torch.load(GOLDEN / "ddrm" / "ref_sr4.pt", weights_only=True)["model_calls"]
    with torch.no_grad():
        err = max(rel_l2(adm.unet_sample(c["x_in"].to(device), c["t"].to(device)), c["out"]) for c in calls)
    out.append({"check": f"golden ADM, {len(calls)} calls on {device}", "ok": err <= 1e-4, "detail": f"max rel L2 {err:.2e}"})
    ldm = load_prior(GOLDEN / "ldm" / "ldm_sr_tiny.ckpt", device=device)
    ref = torch.load(GOLDEN / "ldm" / "ldm_sr_tiny_ref.pt", weights_only=True)
    fs = ref["first_stage"]
    with torch.no_grad():
        errs = [rel_l2(ldm.eps(d["z_t"].to(device), d["t"].to(device), d["lr"].to(device)), d["eps"]) for d in ref["unet"]]
        errs += [rel_l2(ldm.encode(fs["x"].to(device)), fs["h"]), rel_l2(ldm.decode(fs["h"].to(device)), fs["decode_h_quantized"])]
    err = max(errs)
    out.append({"check": f"golden LDM-SR UNet + first stage on {device}", "ok": err <= 1e-4, "detail": f"max rel L2 {err:.2e}"})
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return out


# ------------------------------------------------------------------------------------------------
# 2. speed


def build_adm_prior(device: str, dtype, dry: bool):
    import torch

    from diffrestore.priors.adm import adm_config, build_adm_unet
    from diffrestore.priors.pixel import UNetPixelPrior

    torch.manual_seed(0)
    cfg = adm_config(**TINY_ADM) if dry else adm_config()  # the defaults are the 256x256 unconditional model
    dtype = None if dtype == torch.float32 else dtype
    return UNetPixelPrior(build_adm_unet(cfg, device=device), dtype=dtype).to(device), cfg["sample_size"]


def build_ldm_prior(device: str, dtype, dry: bool):
    import torch
    from diffusers import UNet2DModel, VQModel

    from diffrestore.priors.latent import DiffusersLatentSRPrior

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DModel(**(TINY_LDM_UNET if dry else LDM_UNET))
        vq = VQModel(**(TINY_LDM_VQ if dry else LDM_VQ))
    dtype = None if dtype == torch.float32 else dtype
    return DiffusersLatentSRPrior(unet, vq, dtype=dtype).to(device), 64 if dry else 256


def compiled(prior, dry: bool):
    """The prior with its UNet's forward compiled (the dry run compiles with dynamo's eager backend: no codegen)."""
    import torch

    prior.unet.forward = torch.compile(prior.unet.forward, backend="eager" if dry else "inductor")
    return prior


def time_rows(device: str, dry: bool, deadline: float) -> list[dict]:
    """Every (network, dtype, compile, batch, steps) row; rows past the deadline are listed as skipped."""
    import torch

    plan = [("ddrm", "ADM-256", build_adm_prior, (1, 2) if dry else (20, 100)),
            ("srldm", "LDM-SR", build_ldm_prior, (2,) if dry else (100,))]  # fmt: skip
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    # fp16 on a CPU is ~15x slower than fp32: the dry run times fp32 in its place, and compiles once
    combos = [(False, "bf16"), (False, "fp32"), (True, "bf16")] if dry else [(c, n) for c in (False, True) for n in ("bf16", "fp16")]
    rows = []
    for compile_, name in combos:
        for method, net, build, step_list in plan:
            head = {"method": method, "network": net, "dtype": name, "compile": compile_}
            if time.monotonic() > deadline:
                rows += [{**head, "batch": b, "steps": s, "skipped": "time budget"} for b in (1, 16) for s in step_list]
                continue
            prior, size = build(device, dtypes[name], dry)
            if compile_:
                prior = compiled(prior, dry)
            batches = ((1,) if compile_ else (1, 2)) if dry else (1, 16)  # a compile per batch size: once in the dry run
            rows += time_network(prior, method, size, head, batches, step_list, device, deadline)
            del prior
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


def time_network(prior, method: str, size: int, head: dict, batches, step_list, device: str, deadline: float) -> list[dict]:
    """sr4 restores of random ``size`` images with one prior: a one-step warm-up (compiles), then the timed run."""
    import torch

    from diffrestore.operators.tasks import make_task
    from diffrestore.restoration import run_method

    task = make_task("sr4", (3, size, size))
    priors = {"pixel": prior, "latent": prior}
    rows = []
    for batch in batches:
        x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        y = task.operator.H(x).to(device)
        for steps in step_list:
            row = {**head, "batch": batch, "steps": steps}
            rows.append(row)
            if time.monotonic() > deadline:
                row["skipped"] = "time budget"
                continue
            with torch.no_grad():
                t0 = time.perf_counter()
                run_method(method, priors, task, y, steps=1, seed=0)
                row["warmup_s"] = time.perf_counter() - t0
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                seconds = run_method(method, priors, task, y, steps=steps, seed=0).seconds
            row.update(seconds=seconds, images_per_s=batch / seconds)
            if device.startswith("cuda"):
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return rows


# ------------------------------------------------------------------------------------------------
# 3. two ranks


def write_images(folder: Path, count: int = 4) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        a = rng.integers(0, 256, (17, 17, 3)).astype(np.uint8)
        Image.fromarray(a).resize((72, 72), Image.BILINEAR).save(folder / f"img{i}.png")
    return folder


def torchrun(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)


def failure(proc: subprocess.CompletedProcess) -> str:
    """The ranks' own error lines (not torchrun's report around them)."""
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower() and "elastic" not in ln]
    return " | ".join(dict.fromkeys(lines))[-400:] or proc.stderr.strip()[-400:]


def two_rank_checks(device: str, dry: bool, tmp: Path) -> list[dict]:
    import torch

    data = write_images(tmp / "data")
    ev = ["-m", "diffrestore", "evaluate", "--data", str(data), "--out", str(tmp / "run"), "--num-images", "2" if dry else "4",
          "--size", "64", "--tasks", "sr4", "--methods", "ddrm,srldm", "--steps", "1" if dry else "5", "--device", device.split(":")[0],
          "--dtype", "bf16", "--pixel-prior", "builtin:pixel-s", "--latent-prior", "builtin:ldmsr-xs", "--no-progress"]  # fmt: skip
    t0 = time.perf_counter()
    proc = torchrun(ev, timeout=240)
    records = len((tmp / "run" / "records.jsonl").read_text().splitlines()) if (tmp / "run" / "records.jsonl").is_file() else 0
    detail = f"{records} records in {time.perf_counter() - t0:.1f} s" if proc.returncode == 0 else failure(proc)
    out = [{"check": f"torchrun 2 ranks: evaluate on {device}", "ok": proc.returncode == 0, "detail": detail}]
    backend = "gloo" if dry else "nccl"
    if not dry and torch.cuda.device_count() < 2:
        out.append({"check": "torchrun 2 ranks: nccl all-reduce", "ok": None,
                    "detail": f"skipped: {torch.cuda.device_count()} GPU (NCCL needs one GPU per rank)"})  # fmt: skip
        return out
    proc = torchrun([str(Path(__file__).resolve()), "--collective", backend], timeout=120)
    out.append({"check": f"torchrun 2 ranks: {backend} all-reduce", "ok": proc.returncode == 0,
                "detail": "sum 1 + 2 = 3 on both ranks" if proc.returncode == 0 else failure(proc)})  # fmt: skip
    return out


def collective(backend: str) -> None:
    """One rank of the all-reduce probe (run under torchrun)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = f"cuda:{rank % torch.cuda.device_count()}" if backend == "nccl" else "cpu"
    x = torch.tensor([rank + 1.0], device=device)
    dist.all_reduce(x)
    dist.destroy_process_group()
    if float(x) != 3.0:
        raise SystemExit(f"rank {rank}: all-reduce gave {float(x)}")


# ------------------------------------------------------------------------------------------------


def print_table(result: dict) -> None:
    print(f"device check on {result['device_name']} ({result['mode']}), torch {result['torch']}, {result['install']}")
    for c in result["checks"]:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[c["ok"]]
        print(f"  [{mark}] {c['check']}: {c['detail']}")
    print(f"  {'method':6s} {'network':8s} {'dtype':5s} {'compile':7s} {'batch':>5s} {'steps':>5s} {'seconds':>8s} {'img/s':>8s} {'warm-up s':>9s} {'peak GiB':>8s}")
    for r in result["rows"]:
        head = f"  {r['method']:6s} {r['network']:8s} {r['dtype']:5s} {'yes' if r['compile'] else 'no':7s} {r['batch']:5d} {r['steps']:5d}"
        if "skipped" in r:
            print(f"{head} skipped ({r['skipped']})")
        else:
            print(f"{head} {r['seconds']:8.2f} {r['images_per_s']:8.3f} {r['warmup_s']:9.1f} {r.get('peak_gib', float('nan')):8.1f}")
    print(f"total {result['total_s']:.0f} s; JSON in {result['json']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, gloo instead of nccl")
    ap.add_argument("--json", default="device_check.json", help="where to write the results (default device_check.json)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no speed row after this many seconds (default 330; dry run: none)")
    ap.add_argument("--collective", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.collective:
        collective(args.collective)
        return 0
    start = time.monotonic()
    install = ensure_importable()
    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("device_check: error: no CUDA device (use --dry-run for the CPU check)", file=sys.stderr)
        return 2
    device = "cpu" if dry else "cuda"
    if dry:
        torch.set_num_threads(1)
    else:
        torch.backends.cudnn.benchmark = True
    checks = [golden_pytest(dry), *golden_on_device(device)]
    with tempfile.TemporaryDirectory() as tmp:
        checks += two_rank_checks(device, dry, Path(tmp))
    budget = args.budget_s if args.budget_s is not None else (float("inf") if dry else 330)
    rows = time_rows(device, dry, deadline=start + budget)
    result = {
        "mode": "dry run (CPU, tiny sizes)" if dry else "full", "device_name": torch.cuda.get_device_name() if not dry else platform.processor() or "cpu",
        "torch": torch.__version__, "install": install, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "checks": checks, "rows": rows, "total_s": time.monotonic() - start, "json": args.json,
    }  # fmt: skip
    Path(args.json).write_text(json.dumps(result, indent=1))
    print_table(result)
    return 0 if all(c["ok"] is not False for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
