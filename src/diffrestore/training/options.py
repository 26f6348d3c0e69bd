"""The options every trainer shares (:class:`LoopOptions`), their command line and checks, and the
trainers' ``main`` (:func:`cli_main`: a user error is one line ``diffrestore: error: ...``, exit 2).

A plain ``--resume`` continues with the options the run was started with (read from its checkpoint).
Every check here runs before a run folder exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import torch

from ..image_io import remove_if_empty
from .checkpoints import CHECKPOINT_NAME, TrainingError, one_line, read_options

PRECISIONS = {
    "fp32": "fp32",
    "bf16": "bf16 mixed precision (autocast forward passes; losses, weights, gradients and AdamW state in fp32)",
}


def training_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise TrainingError(f"--device {device!r}: not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise TrainingError(f"--device {device!r}: training runs on cpu or cuda")
    return dev


def parse_with_resume_defaults(parser, argv, rename: dict | None = None):
    """Parse ``argv``; with ``--resume``, options not given on the command line default to the values the
    run was started (or last resumed) with, read from ``RUN/checkpoint.pt`` ("options"), so a plain
    ``--resume`` continues the same recipe. ``rename`` maps option keys to argparse dests."""
    args = parser.parse_args(argv)
    if not getattr(args, "resume", False):
        return args
    ckpt = Path(args.run) / CHECKPOINT_NAME
    if not ckpt.is_file():
        return args
    opts = read_options(ckpt)
    rename = rename or {}
    dests = {a.dest for a in parser._actions}
    defaults = {}
    for k, v in opts.items():
        dest = rename.get(k, k)
        if dest in dests and not isinstance(v, (list, dict)):
            defaults[dest] = v
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)



@dataclasses.dataclass
class LoopOptions:
    """The training-loop options shared by every trainer.

    A trainer takes them as keyword arguments (``train_pixel(..., steps=4, batch=2)``) or as
    ``loop=LoopOptions(...)``; its own defaults (e.g. ``warmup``) are given to :meth:`resolve`.
    """

    steps: int = 300_000  # total steps (stop there)
    batch: int = 16
    lr: float = 2e-4
    warmup: int = 1000  # linear warm-up steps
    grad_clip: float = 1.0  # gradient-norm clip (0: none)
    ema_decay: float = 0.999
    holdout_every: int = 28  # every N-th photo (sorted order) held out for validation
    ckpt_every_s: float = 300.0
    ckpt_every_steps: int = 0
    log_every: int = 50
    max_minutes: float | None = None  # stop (with a checkpoint) after this long
    resume: bool = False
    threads: int = 1
    device: str = "cpu"
    precision: str = "fp32"  # "bf16": autocast forward passes (faster where the CPU or GPU has bf16)
    seed: int = 0
    progress: bool = True
    progress_interval: float = 10.0  # seconds between progress-bar updates

    @classmethod
    def resolve(cls, loop: LoopOptions | None, overrides: dict, **defaults) -> LoopOptions:
        """``loop`` (default: these defaults with the trainer's ``defaults`` over them) with ``overrides``
        applied; an unknown name is a TypeError, as for any keyword argument."""
        return dataclasses.replace(loop if loop is not None else cls(**defaults), **overrides)

    def check(self) -> None:
        """Raise TrainingError (one line, naming the command-line option) for a value no run can use."""
        whole = {"steps": (self.steps, 1), "batch": (self.batch, 1), "warmup": (self.warmup, 0),
                 "holdout-every": (self.holdout_every, 0), "ckpt-every-steps": (self.ckpt_every_steps, 0),
                 "log-every": (self.log_every, 1), "threads": (self.threads, 1)}  # fmt: skip
        for name, (v, low) in whole.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise TrainingError(f"--{name} {v}: must be a whole number >= {low}")
        real = {"lr": (self.lr, 0.0, False), "grad-clip": (self.grad_clip, 0.0, True),
                "ckpt-every-s": (self.ckpt_every_s, 0.0, True), "progress-interval": (self.progress_interval, 0.0, True),
                "max-minutes": (self.max_minutes, 0.0, False)}  # fmt: skip
        for name, (v, low, closed) in real.items():
            if name == "max-minutes" and v is None:
                continue
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < low or (v == low and not closed):
                raise TrainingError(f"--{name} {v}: must be a finite number {'>=' if closed else '>'} {low:g}")
        if not (isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay <= 1.0):
            raise TrainingError(f"--ema {self.ema_decay}: the EMA decay must be in [0, 1]")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"--precision {self.precision!r}: expected one of {', '.join(sorted(PRECISIONS))}")

    @classmethod
    def kwargs_from_args(cls, args: argparse.Namespace) -> dict:
        """The options parsed by :func:`add_loop_arguments`, as keyword arguments; an option left at
        ``None`` whose default here is not ``None`` (``--warmup`` of latent_sr) is left out, so the
        trainer's own default applies."""
        kw = {}
        for f in dataclasses.fields(cls):
            v = (not args.no_progress) if f.name == "progress" else getattr(args, LOOP_ARG_DESTS.get(f.name, f.name))
            if v is None and f.default is not None:
                continue
            kw[f.name] = v
        return kw


# option key (LoopOptions field, "options" record of a checkpoint) -> argparse dest where they differ
LOOP_ARG_DESTS = {"ema_decay": "ema"}


def int_list(s: str) -> tuple[int, ...]:
    """argparse type of ``--channels 16,32,64``."""
    return tuple(int(v) for v in s.split(",") if v.strip())


def add_loop_arguments(
    p: argparse.ArgumentParser, *, data_help=None, out_help=None, warmup: int | None = LoopOptions.warmup,
    warmup_help=None,
) -> None:
    """``--data``, ``--out``, ``--run``, ``--resume`` and the :class:`LoopOptions` of a trainer's command line."""
    d = LoopOptions
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--out", default=None, help=out_help)
    p.add_argument("--run", required=True, help="folder for the full checkpoint and log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=warmup, help=warmup_help)
    p.add_argument("--steps", type=int, default=d.steps, help="total steps (stop there)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--ema", type=float, default=d.ema_decay, help="EMA decay")
    p.add_argument("--holdout-every", type=int, default=d.holdout_every)
    p.add_argument("--ckpt-every-s", type=float, default=d.ckpt_every_s)
    p.add_argument("--ckpt-every-steps", type=int, default=d.ckpt_every_steps)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument(
        "--max-minutes", type=float, default=d.max_minutes, help="stop (with a checkpoint) after this long"
    )
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--device", default=d.device)
    p.add_argument(
        "--precision", choices=sorted(PRECISIONS), default=d.precision,
        help="bf16: mixed-precision forward passes (fp32 weights and optimiser); faster where the CPU or GPU has bf16",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--progress-interval", type=float, default=d.progress_interval, help="seconds between progress-bar updates"
    )


def cli_main(parser: argparse.ArgumentParser, argv, train) -> int:
    """Parse (``--resume`` defaults from the checkpoint), call ``train(args, loop_kwargs)``, print its result
    as JSON. A TrainingError or a file-system error is one line ``diffrestore: error: ...`` on stderr and
    exit status 2, and a ``--run`` or ``--out`` folder this call created is removed again if still empty."""
    args = parser.parse_args(argv)
    made = [Path(p) for p in (args.run, args.out) if p is not None and not Path(p).exists()]
    try:
        args = parse_with_resume_defaults(parser, argv, rename=LOOP_ARG_DESTS)
        result = train(args, LoopOptions.kwargs_from_args(args))
    except (TrainingError, OSError) as e:
        for folder in made:
            remove_if_empty(folder)
        print(f"diffrestore: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=str))
    return 0


def check_folder(path: str | os.PathLike, option: str) -> Path:
    """``path`` if it is a folder, or can be created as one, where this process may write; else TrainingError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TrainingError(f"{option} {path}: exists and is not a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise TrainingError(f"{option} {path}: cannot write in {probe}")
    return path


def check_architecture(crop: int, channels, norm_groups: int, scale: int = 1) -> None:
    """Refuse a model whose group norm cannot split its ``channels`` widths, or a ``crop`` it cannot take
    (a UNet or encoder with n widths halves its input n - 1 times, after the ``scale`` of an autoencoder)."""
    channels = list(channels)
    if not channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
        raise TrainingError(f"--channels {','.join(map(str, channels)) or '(none)'}: expected positive widths such as 16,32,64")
    if isinstance(norm_groups, bool) or not isinstance(norm_groups, int) or norm_groups < 1 or any(
        c % norm_groups for c in channels
    ):
        raise TrainingError(f"--norm-groups {norm_groups}: must divide every --channels width {channels}")
    step = scale * 2 ** (len(channels) - 1)
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < step or crop % step:
        raise TrainingError(f"--crop {crop}: must be a positive multiple of {step} for this model")
