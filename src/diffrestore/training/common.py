"""Shared training machinery: threads, EMA, atomic resumable checkpoints, JSON-lines logs, export.

A checkpoint holds everything needed to continue bit-for-bit: model, EMA model, optimizer, step,
cumulative wall time, the numpy ``Generator`` that draws crops and the ``torch.Generator`` that
draws timesteps and noise. It is written to a temporary file beside its target and renamed over it,
so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..io import atomic_path
from ..io import atomic_write_json as _atomic_write_json
from ..io import atomic_write_text as _atomic_write_text

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"


class TrainingError(ValueError):
    """A training request that cannot be carried out (bad option, missing checkpoint, ...)."""


def atomic_write_text(path, text: str) -> None:
    """Atomic text write, world-readable (files shipped in model folders)."""
    _atomic_write_text(path, text)
    os.chmod(path, 0o644)


def atomic_write_json(path, obj) -> None:
    _atomic_write_json(path, obj)
    os.chmod(path, 0o644)


def set_threads(threads: int) -> None:
    torch.set_num_threads(max(1, int(threads)))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (or parallel work already started)
        pass


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class EMA:
    """Exponential moving average of a model's parameters, with the usual warm-up of the decay.

    The effective decay at update ``n`` is ``min(decay, (1 + n) / (10 + n))`` so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        ema_p = [p for p in self.model.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for eb, sb in zip(self.model.buffers(), model.buffers()):
            eb.copy_(sb)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        self.model.load_state_dict(state["model"])


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant (runs are extended by resuming)."""
    if warmup <= 0:
        return lr
    return lr * min(1.0, (step + 1) / warmup)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: no checkpoint to resume from")
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state(np_rng: np.random.Generator, gen: torch.Generator) -> dict:
    return {"numpy": np_rng.bit_generator.state, "torch": gen.get_state()}


def set_rng_state(np_rng: np.random.Generator, gen: torch.Generator, state: dict) -> None:
    np_rng.bit_generator.state = state["numpy"]
    gen.set_state(state["torch"])


class JsonlLog:
    """Append-only JSON-lines log (one record per line, flushed at once)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        record.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()


def save_diffusers_fp16(model: nn.Module, folder: str | os.PathLike) -> None:
    """Write ``model`` (a diffusers ModelMixin) in fp16 safetensors into ``folder``, file by file atomically.

    The model is saved to a hidden temporary folder beside ``folder`` first; each file is then renamed
    into place, so a reader never sees a truncated weight file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to("cpu").half()
    tmp = folder.parent / f".{folder.name}.export-{os.getpid()}"
    if tmp.exists():
        _rmtree(tmp)
    try:
        half.save_pretrained(tmp, safe_serialization=True)
        for f in sorted(tmp.iterdir()):
            os.chmod(f, 0o644)
            os.replace(f, folder / f.name)
    finally:
        if tmp.exists():
            _rmtree(tmp)


def _rmtree(p: Path) -> None:
    for f in p.iterdir():
        if f.is_dir():
            _rmtree(f)
        else:
            f.unlink()
    p.rmdir()


def hardware_string(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({cpu}), {threads} thread(s), torch {torch.__version__}"


def fmt_hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), averaged over the batch."""
    mse = ((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(4.0 / mse)).mean())


__all__ = [
    "CHECKPOINT_NAME",
    "LOG_NAME",
    "EMA",
    "JsonlLog",
    "TrainingError",
    "atomic_write_json",
    "atomic_write_text",
    "fmt_hours",
    "hardware_string",
    "load_checkpoint",
    "lr_at",
    "param_count",
    "psnr",
    "resolve_device",
    "rng_state",
    "save_checkpoint",
    "save_diffusers_fp16",
    "set_rng_state",
    "set_threads",
]


class StopFlag:
    """Set by SIGTERM/SIGINT so the loop can write a last checkpoint before exiting."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handler(self, signum, frame):
        self.stop = True

    def __exit__(self, *exc):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def run_loop(
    *,
    start_step: int,
    steps: int,
    elapsed_before: float,
    step_fn,
    checkpoint_fn,
    log: JsonlLog,
    log_every: int = 50,
    ckpt_every_s: float = 300.0,
    ckpt_every_steps: int = 0,
    max_minutes: float | None = None,
    progress: bool = True,
    progress_interval: float = 10.0,
    desc: str = "train",
) -> dict:
    """Run ``step_fn(step) -> (loss, lr)`` from ``start_step`` to ``steps``.

    ``checkpoint_fn(step, elapsed)`` is called every ``ckpt_every_s`` seconds of wall time and/or every
    ``ckpt_every_steps`` steps, and once at the end (steps reached, ``max_minutes`` spent, or
    SIGTERM/SIGINT). ``elapsed`` is the cumulative training wall time over all sessions.
    Returns {"step", "loss" (mean of the last logging window), "elapsed"}.
    """
    from tqdm import tqdm

    t_start = time.time()
    last_ckpt = t_start
    step = start_step
    window: list[float] = []
    last_loss = float("nan")
    bar = tqdm(
        total=steps, initial=step, desc=desc, disable=not progress, mininterval=progress_interval,
        dynamic_ncols=True,
    )
    deadline = t_start + max_minutes * 60 if max_minutes else None
    saved_at = None
    with StopFlag() as flag:
        try:
            while step < steps and not flag.stop:
                if deadline is not None and time.time() >= deadline:
                    break
                loss, lr = step_fn(step)
                if not math.isfinite(loss):  # keep the last good checkpoint
                    raise TrainingError(f"loss is not finite at step {step} ({loss})")
                step += 1
                window.append(loss)
                bar.update(1)
                if step % log_every == 0 or step == steps:
                    last_loss = sum(window) / len(window)
                    window.clear()
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                    log.write(step=step, loss=last_loss, lr=lr, elapsed=round(elapsed_before + time.time() - t_start, 1))
                now = time.time()
                if (ckpt_every_s and now - last_ckpt >= ckpt_every_s) or (
                    ckpt_every_steps and step % ckpt_every_steps == 0
                ):
                    checkpoint_fn(step, elapsed_before + now - t_start)
                    last_ckpt = time.time()
                    saved_at = step
        finally:
            bar.close()
        if saved_at != step:
            checkpoint_fn(step, elapsed_before + time.time() - t_start)
    if window:
        last_loss = sum(window) / len(window)
    return {"step": step, "loss": last_loss, "elapsed": elapsed_before + time.time() - t_start}


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
    opts = torch.load(ckpt, map_location="cpu", weights_only=False).get("options", {})
    rename = rename or {}
    dests = {a.dest for a in parser._actions}
    defaults = {}
    for k, v in opts.items():
        dest = rename.get(k, k)
        if dest in dests and not isinstance(v, (list, dict)):
            defaults[dest] = v
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)
