"""The ``diffrestore`` command.

Every user-caused failure (bad file, wrong checkpoint, impossible size, unwritable folder) ends as
one line ``diffrestore: error: ...`` on stderr and exit status 2, with no output files written.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, FloatingPointError)


class CLIError(Exception):
    """An error to report as one line."""


# --------------------------------------------------------------------------------------------
# restore
# --------------------------------------------------------------------------------------------


def _add_restore(sub) -> None:
    p = sub.add_parser(
        "restore",
        help="restore degraded images (or degrade clean ones with --degrade, then restore and score)",
        description="Restore images. Without --degrade each IMG is the measurement y (e.g. the 64x64 "
        "low-resolution image for sr4). With --degrade each IMG is a clean image: it is degraded with "
        "the task's operator and noise, restored, and scored (PSNR/SSIM) against the clean image.",
    )
    p.add_argument("images", nargs="+", metavar="IMG")
    p.add_argument("--task", required=True, help="task name (see `diffrestore tasks`)")
    p.add_argument("--method", default="ddrm", help="ddrm, srldm, ddrm-srldm, ddrm-ldm")
    p.add_argument("--prior", required=True, help="model: a path (ADM .pt, LDM .ckpt, diffusers folder) or builtin:NAME")
    p.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the method's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--degrade", action="store_true", help="inputs are clean images: degrade, restore, score")
    p.add_argument("--sigma-y", type=float, default=None, help="measurement noise std in [-1,1] units")
    p.add_argument("--blur-sigma", type=float, default=None, help="Gaussian blur std in pixels")
    p.add_argument("--scale", type=int, default=None, help="super-resolution factor")
    p.add_argument("--mask", default=None, help="inpainting mask image (white = observed)")
    p.add_argument("--eta", type=float, default=None, help="DDRM eta / DDIM eta")
    p.add_argument("--eta-b", type=float, default=None, help="DDRM eta_b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="network precision")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_restore)


def _check_writable_dir(path: Path) -> bool:
    """Make sure ``path`` can receive files; returns True if this call created it."""
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        if created:
            _remove_if_empty(path)
        raise CLIError(f"output folder {path} is not writable ({e.strerror or e})") from None
    return created


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def cmd_restore(args) -> int:
    from diffrestore import io
    from diffrestore.methods import get_method
    from diffrestore.operators.tasks import make_task
    from diffrestore.pipeline import image_seed, restore_file_inputs
    from diffrestore.priors.loading import load_prior

    info = get_method(args.method)
    overrides = {k: v for k, v in (("sigma_y", args.sigma_y), ("blur_sigma", args.blur_sigma), ("scale", args.scale)) if v is not None}
    make_task(args.task, (3, 64, 64), **overrides)  # validates the task name and parameters early

    # Read every input before writing anything, so a bad file leaves no output behind.
    images = [(Path(p), io.read_image(p)) for p in args.images]
    mask = io.read_image(args.mask) if args.mask else None
    out = Path(args.out)
    created = _check_writable_dir(out)
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    written: list[Path] = []
    try:
        prior = load_prior(args.prior, device=args.device, dtype=dtype)
        kind = "latent" if hasattr(prior, "encode") else "pixel"
        if kind != info.prior:
            raise CLIError(f"method {info.name} needs a {info.prior} prior, but {args.prior} is a {kind} prior")
        results = restore_file_inputs(
            images,
            method=info.name,
            prior=prior,
            prior_spec=args.prior,
            task_name=args.task,
            overrides=overrides,
            degrade=args.degrade,
            mask=mask,
            steps=args.steps,
            seed=args.seed,
            device=args.device,
            out=out,
            written=written,
            method_kwargs={"eta": args.eta, "eta_b": args.eta_b},
            progress=not args.no_progress,
        )
    except BaseException:
        for f in written:
            f.unlink(missing_ok=True)
        if created:
            _remove_if_empty(out)
        raise
    for r in results:
        line = f"{r['input']}: {r['method']} {r['task']} in {r['seconds']:.1f}s"
        if "psnr" in r:
            line += f"  PSNR {r['psnr']:.2f} dB (baseline {r['baseline_psnr']:.2f})  SSIM {r['ssim']:.4f}"
        print(line)
    print(f"results in {out}/")
    return 0


def cmd_tasks(args) -> int:
    from diffrestore.operators.tasks import list_tasks

    for name, summary in list_tasks():
        print(f"{name:16s} {summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffrestore", description="Diffusion-based image restoration and benchmarking.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_restore(sub)
    p = sub.add_parser("tasks", help="list the degradation tasks")
    p.set_defaults(func=cmd_tasks)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        msg = str(e)
    except USER_ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    except KeyboardInterrupt:
        print("diffrestore: interrupted", file=sys.stderr)
        return 130
    print(f"diffrestore: error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
