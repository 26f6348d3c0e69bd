"""Large photos: DDRM denoise and 4x SR of a 12-megapixel photo with a tiled prior, against 1 megapixel.

For each task the real photo (by default the largest of ``imagenet-sample-500``, upscaled bicubically
to 4000x3000; and the same photo at 1152x864, about 1 MP) is degraded once (denoise: + N(0, 0.1^2) in
[-1, 1] units; sr4: 4x4 block averages) and saved as an 8-bit PNG, then restored by the command a user
would type, ``diffrestore restore MEASUREMENT --task T --tile N`` (no ``--degrade``: no clean image and
no scoring), one process per run. Each run reports the method's time (the record's ``seconds``), the
process's wall time and its peak RSS (``os.wait4``). Printed: seconds per megapixel-step at 1 MP and at
12 MP and their ratio (target <= 1.3; judged on the method's CPU time, which other processes on a shared
machine do not inflate; wall time is printed too), and whether the peak RSS stayed <= 3 GB.

    PYTHONPATH=src python bench/large_image.py [--steps 2] [--tile 512] [--overlap 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT.parent / "shared" / "data" / "imagenet-sample-500" / "n03843555_oil_filter.JPEG"
SIZES = {"1MP": (1152, 864), "12MP": (4000, 3000)}  # (width, height); sides multiples of 8 (pixel-s, sr4)
GB = 1024**3


def make_inputs(photo: Path, folder: Path) -> dict[tuple[str, str], Path]:
    """The degraded PNGs: (task, size name) -> path."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    out = {}
    with Image.open(photo) as img:
        rgb = img.convert("RGB")
        for name, (w, h) in SIZES.items():
            clean = np.asarray(rgb.resize((w, h), Image.BICUBIC), dtype=np.float32) / 127.5 - 1
            x = torch.from_numpy(clean).permute(2, 0, 1)[None]
            g = torch.Generator().manual_seed(0)
            measurements = {"denoise": x + 0.1 * torch.randn(x.shape, generator=g), "sr4": F.avg_pool2d(x, 4)}
            for task, y in measurements.items():
                a = ((y[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
                out[task, name] = folder / f"{task}_{name}.png"
                Image.fromarray(a).save(out[task, name])
    return out


def child(argv: list[str]) -> None:
    """Run ``diffrestore restore argv`` in this process and print the method's CPU seconds (``BENCH`` line):
    on a shared machine CPU time is what a run costs, wall time also counts the other processes."""
    from diffrestore import cli, restoration

    cpu = []
    run_method = restoration.run_method

    def timed(*a, **k):
        start = time.process_time()
        out = run_method(*a, **k)
        cpu.append(time.process_time() - start)
        return out

    restoration.run_method = timed
    code = cli.main(argv)
    print("BENCH " + json.dumps({"cpu": sum(cpu)}))
    raise SystemExit(code)


def run_restore(measurement: Path, task: str, out: Path, args) -> dict:
    """One ``diffrestore restore`` process: the method's wall and CPU seconds, the process's wall seconds
    and peak RSS in bytes."""
    argv = ["restore", str(measurement), "--task", task, "--prior", args.prior, "--steps", str(args.steps),
            "--tile", str(args.tile), "--overlap", str(args.overlap), "--out", str(out), "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
    out.mkdir(parents=True, exist_ok=True)
    log_out, log_err = out.parent / f"{out.name}.stdout", out.parent / f"{out.name}.stderr"
    start = time.perf_counter()
    with open(log_out, "w") as fo, open(log_err, "w") as fe:
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(argv)], env=env, stdout=fo, stderr=fe)
        _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone
    wall = time.perf_counter() - start
    stdout, stderr = log_out.read_text(), log_err.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: diffrestore {' '.join(argv)}\n{stderr}")
    record = json.loads(next(out.glob("*.json")).read_text())
    bench = json.loads(next(line for line in stdout.splitlines() if line.startswith("BENCH "))[6:])
    return {"seconds": record["seconds"], "cpu": bench["cpu"], "wall": wall, "size": record["size"],
            "peak_rss": usage.ru_maxrss * 1024,
            "command": "diffrestore " + " ".join(argv), "stderr": stderr.strip()}  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photo", type=Path, default=PHOTO)
    p.add_argument("--prior", default="builtin:pixel-s")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tasks", default="denoise,sr4")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        return child(json.loads(args.child))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs = make_inputs(args.photo, folder)
        print(f"photo {args.photo.name}, DDRM {args.steps} steps, {args.prior}, tile {args.tile} overlap {args.overlap}, "
              f"{args.threads} thread(s)")  # fmt: skip
        ok = True
        for task in args.tasks.split(","):
            per_mp_step = {}
            for name in SIZES:
                r = run_restore(inputs[task, name], task, folder / f"out_{task}_{name}", args)
                h, w = r["size"]
                mp_steps = h * w / 1e6 * args.steps
                per_mp_step[name] = (r["cpu"] / mp_steps, r["seconds"] / mp_steps)
                ok &= name != "12MP" or r["peak_rss"] <= 3 * GB
                print(f"{task:8s} {name:5s} {w}x{h}: method {r['seconds']:.0f} s wall, {r['cpu']:.0f} s CPU; process "
                      f"{r['wall']:.0f} s; per MP-step {per_mp_step[name][1]:.1f} s wall, {per_mp_step[name][0]:.1f} s CPU; "
                      f"peak RSS {r['peak_rss'] / GB:.2f} GB")  # fmt: skip
                print(f"         $ {r['command']}")
                if r["stderr"]:
                    print(f"         stderr: {r['stderr']}")
            cpu_ratio, wall_ratio = (per_mp_step["12MP"][i] / per_mp_step["1MP"][i] for i in (0, 1))
            ok &= cpu_ratio <= 1.3
            print(f"{task:8s} per MP-step 12 MP / 1 MP: CPU {cpu_ratio:.2f} (target <= 1.3), wall {wall_ratio:.2f}")
        print("PASS" if ok else "FAIL", "(peak RSS <= 3 GB at 12 MP, CPU time per MP-step ratio <= 1.3)")


if __name__ == "__main__":
    main()
