"""Shared training machinery: threads, EMA, atomic resumable checkpoints, JSON-lines logs, export.

A checkpoint holds everything needed to continue bit-for-bit: model, EMA model, optimizer, step,
cumulative wall time, the numpy ``Generator`` that draws crops and the ``torch.Generator`` that
draws timesteps and noise. It is written to a temporary file beside its target and renamed over it,
so a run killed mid-write leaves the previous checkpoint intact.

The options every trainer shares (steps, batch, learning rate and warm-up, gradient clip, EMA decay,
hold-out, checkpoint and log cadence, time limit, threads, device, seed, progress) are one
:class:`LoopOptions`; :func:`add_loop_arguments` puts them on a trainer's command line and
:class:`Trainer` does the work around a trainer's own model and loss (run folder, resume, EMA,
AdamW, RNGs, optimiser step, checkpoints, log, loop).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import sys
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


def option_stages(log_path: str | os.PathLike, key: str, default=None) -> list[tuple[int, object]]:
    """``(first step, value)`` of each stretch of a run trained with one value of option ``key``, read
    from the "start" records of its log: a resume with another value (a cool-down ``--lr``, a switch of
    ``--precision``) begins a new stretch, a resume from an earlier checkpoint drops the stretches after
    it, a fresh start clears them. ``default`` stands for a start record without ``key`` (older logs)."""
    stages: list[tuple[int, object]] = []
    try:
        lines = Path(log_path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return stages
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if rec.get("event") != "start":
            continue
        step, value = int(rec["step"]), rec["options"].get(key, default)
        stages = [s for s in stages if s[0] < step] if rec.get("resume") else []
        if not stages or stages[-1][1] != value:
            stages.append((step, value))
    return stages


def lr_stages(log_path: str | os.PathLike) -> list[tuple[int, float]]:
    """The learning-rate stretches of a run (see :func:`option_stages`)."""
    return [(step, float(lr)) for step, lr in option_stages(log_path, "lr")]


def describe_lr(stages: list[tuple[int, float]], warmup: int) -> str:
    """The learning-rate history for a model README, e.g. "lr 0.0002 (linear warm-up 200 steps) to step
    8,724, then 0.0001 to step 20,734, then 5e-05 (each change a resume with `--lr`)"."""
    if not stages:
        return "lr unknown (no start record in the log)"
    text = f"lr {stages[0][1]:g} (linear warm-up {warmup} steps"
    if len(stages) == 1:
        return text + ", then constant)"
    text += ")"
    for step, lr in stages[1:]:
        text += f" to step {step:,}, then {lr:g}"
    return text + " (each change a resume with `--lr`)"


PRECISIONS = {
    "fp32": "fp32",
    "bf16": "bf16 mixed precision (autocast forward passes; losses, weights, gradients and AdamW state in fp32)",
}


def describe_precision(stages: list[tuple[int, object]]) -> str:
    """The arithmetic history for a model README, e.g. "fp32 to step 11,000, then bf16 mixed precision (...)"."""
    if not stages:
        return "fp32"
    text = PRECISIONS[stages[0][1]]
    for step, value in stages[1:]:
        text += f" to step {step:,}, then {PRECISIONS[value]}"
    return text


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
        # a record cut short by a crash must not swallow the first record of the resumed run
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

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


def unet2d(in_channels, out_channels, block_out_channels, layers_per_block, attention, norm_num_groups, sample_size):
    """The eps-prediction ``diffusers.UNet2DModel`` of the built-in priors: plain Down/Up blocks (attention in
    the mid block only, if ``attention``), scale-shift time conditioning."""
    from diffusers import UNet2DModel

    n = len(block_out_channels)
    return UNet2DModel(
        sample_size=int(sample_size),
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        block_out_channels=tuple(int(c) for c in block_out_channels),
        layers_per_block=int(layers_per_block),
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        add_attention=bool(attention),
        norm_num_groups=int(norm_num_groups),
        resnet_time_scale_shift="scale_shift",
    )


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), averaged over the batch."""
    mse = ((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(4.0 / mse)).mean())


__all__ = [
    "CHECKPOINT_NAME",
    "LOG_NAME",
    "EMA",
    "JsonlLog",
    "LoopOptions",
    "Trainer",
    "TrainingError",
    "add_loop_arguments",
    "atomic_write_json",
    "atomic_write_text",
    "fmt_hours",
    "cli_main",
    "describe_lr",
    "describe_precision",
    "hardware_string",
    "int_list",
    "load_checkpoint",
    "lr_at",
    "lr_stages",
    "option_stages",
    "param_count",
    "psnr",
    "resolve_device",
    "rng_state",
    "save_checkpoint",
    "save_diffusers_fp16",
    "set_rng_state",
    "set_threads",
    "unet2d",
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


# ---------------------------------------------------------------------------------------------
# the options every trainer shares, their command-line form, and the work around a model and loss
# ---------------------------------------------------------------------------------------------


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
    precision: str = "fp32"  # "bf16": autocast forward passes (pixel-m here: 1.6 instead of 1.1 steps/s)
    seed: int = 0
    progress: bool = True
    progress_interval: float = 10.0  # seconds between progress-bar updates

    @classmethod
    def resolve(cls, loop: LoopOptions | None, overrides: dict, **defaults) -> LoopOptions:
        """``loop`` (default: these defaults with the trainer's ``defaults`` over them) with ``overrides``
        applied; an unknown name is a TypeError, as for any keyword argument."""
        return dataclasses.replace(loop if loop is not None else cls(**defaults), **overrides)

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
    as JSON; a TrainingError is one line on stderr and exit status 2."""
    args = parse_with_resume_defaults(parser, argv, rename=LOOP_ARG_DESTS)
    try:
        result = train(args, LoopOptions.kwargs_from_args(args))
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=str))
    return 0


class Trainer:
    """What every trainer does around its own model and loss.

    ``Trainer(run_dir, loop)`` sets the threads, resolves the device, creates the run folder (refusing to
    overwrite a checkpoint unless ``loop.resume``) and loads the checkpoint to resume from (``resumed``).
    :meth:`build_model` seeds torch and builds the model, its EMA, AdamW and the two RNGs, restored from
    the checkpoint on resume; :meth:`optimize` is the optimiser step of ``step_fn``; :meth:`save` writes
    the checkpoint; :meth:`train` runs the loop and logs its end.
    """

    def __init__(self, run_dir, loop: LoopOptions):
        if loop.precision not in PRECISIONS:
            raise TrainingError(f"precision {loop.precision!r}: expected one of {', '.join(sorted(PRECISIONS))}")
        set_threads(loop.threads)
        self.loop = loop
        self.device = resolve_device(loop.device)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.run_dir / CHECKPOINT_NAME
        if not loop.resume and self.ckpt_path.exists():
            raise TrainingError(f"{self.ckpt_path} exists: pass --resume to continue it, or choose another --run")
        self.resumed: dict | None = load_checkpoint(self.ckpt_path) if loop.resume else None
        self.log = JsonlLog(self.run_dir / LOG_NAME)
        self.hardware = hardware_string(self.device, loop.threads)

    def build_model(self, build, model_cfg: dict, *, weight_decay: float = 0.0, init=None) -> nn.Module:
        """``build(**model_cfg)`` on the device (the checkpoint's config on resume; then ``init(model,
        model_cfg)``), with EMA, AdamW and the RNGs, all restored from the checkpoint on resume."""
        loop = self.loop
        torch.manual_seed(loop.seed)
        state, self.resumed = self.resumed, None
        self.model_cfg = state["model_cfg"] if state is not None else model_cfg
        model = build(**self.model_cfg).to(self.device)
        if init is not None:
            init(model, self.model_cfg)
        self.model = model
        self.ema = EMA(model, loop.ema_decay)
        self.opt = torch.optim.AdamW(model.parameters(), lr=loop.lr, weight_decay=weight_decay)
        self.np_rng = np.random.default_rng(loop.seed)
        self.gen = torch.Generator().manual_seed(loop.seed)
        self.step, self.elapsed = 0, 0.0
        if state is not None:
            model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["opt"])
            set_rng_state(self.np_rng, self.gen, state["rng"])
            self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
            del state
        self.ema.model.to(self.device)
        return model

    def options(self, **specific) -> dict:
        """The "options" record of checkpoints and logs (read back by ``--resume``): the trainer's own
        options, then the shared ones (``device`` as resolved)."""
        loop = self.loop
        return {
            **specific, "batch": loop.batch, "lr": loop.lr, "warmup": loop.warmup, "grad_clip": loop.grad_clip,
            "ema_decay": loop.ema_decay, "holdout_every": loop.holdout_every, "seed": loop.seed,
            "threads": loop.threads, "device": str(self.device), "precision": loop.precision,
        }

    def log_start(self, options: dict, **record) -> None:
        self.log.write(event="start", step=self.step, resume=bool(self.loop.resume), options=options,
                       model_cfg=self.model_cfg, params=param_count(self.model), **record)
        # the history only changes at a start record: read the log once here, not at every checkpoint
        self._lr_schedule = describe_lr(lr_stages(self.log.path), self.loop.warmup)
        self._precision = describe_precision(option_stages(self.log.path, "precision", "fp32"))

    def lr_schedule(self) -> str:
        """This run's learning-rate history (all its sessions, as of :meth:`log_start`), for the exported
        model's README."""
        return self._lr_schedule

    def precision_history(self) -> str:
        """This run's arithmetic (fp32 / bf16 stretches, as of :meth:`log_start`), for the model's README."""
        return self._precision

    def autocast(self):
        """The context for a step's forward passes: bf16 autocast with ``precision="bf16"``, else a no-op.
        Losses are computed on ``.float()`` outputs outside it."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.loop.precision == "bf16")

    def optimize(self, step: int, loss: torch.Tensor) -> tuple[float, float]:
        """Warm-up learning rate, backward, gradient clip, AdamW step, EMA update; returns (loss, lr)."""
        loop = self.loop
        cur_lr = lr_at(step, loop.lr, loop.warmup)
        for g in self.opt.param_groups:
            g["lr"] = cur_lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if loop.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), loop.grad_clip)
        self.opt.step()
        self.ema.update(self.model)
        return float(loss.detach()), cur_lr

    def save(self, step: int, elapsed: float, kind: str, options: dict, **extra) -> None:
        save_checkpoint(
            self.ckpt_path,
            {
                "kind": kind, "model_cfg": self.model_cfg, "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "opt": self.opt.state_dict(), "rng": rng_state(self.np_rng, self.gen),
                "step": step, "elapsed": elapsed, "options": options, **extra,
            },
        )

    def train(self, step_fn, checkpoint_fn, desc: str, ndigits: int = 6) -> dict:
        """:func:`run_loop` with these options, then a "stop" log record (floats rounded to ``ndigits``)."""
        loop = self.loop
        result = run_loop(
            start_step=self.step, steps=loop.steps, elapsed_before=self.elapsed, step_fn=step_fn,
            checkpoint_fn=checkpoint_fn, log=self.log, log_every=loop.log_every, ckpt_every_s=loop.ckpt_every_s,
            ckpt_every_steps=loop.ckpt_every_steps, max_minutes=loop.max_minutes, progress=loop.progress,
            progress_interval=loop.progress_interval, desc=desc,
        )
        self.log.write(event="stop", **{k: (round(v, ndigits) if isinstance(v, float) else v) for k, v in result.items()})
        return result
