"""Shared training machinery: threads, EMA, JSON-lines logs, export, the loop and the Trainer.

The checkpoint format (everything needed to continue bit-for-bit, read back without running any pickled
code) is :mod:`.checkpoints` and the shared options (:class:`LoopOptions`, their command line, the
trainers' ``main``) are :mod:`.options`; their names are re-exported here.

:class:`Trainer` does the work around a trainer's own model and loss (run folder, resume, EMA, AdamW,
RNGs, optimiser step, checkpoints, log, loop). Every option is checked before the run folder is
created, and the folder is only created when the first log record is written.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..image_io import atomic_write_json as _atomic_write_json
from ..image_io import atomic_write_text as _atomic_write_text
from .checkpoints import (
    CHECKPOINT_NAME,
    TrainingError,
    load_checkpoint,
    one_line,
    read_options,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .loop import run_loop
from .options import (
    LOOP_ARG_DESTS,
    PRECISIONS,
    LoopOptions,
    add_loop_arguments,
    check_architecture,
    check_folder,
    cli_main,
    int_list,
    parse_with_resume_defaults,
    resolve_device,
)

LOG_NAME = "log.jsonl"


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


def describe_precision(stages: list[tuple[int, object]]) -> str:
    """The arithmetic history for a model README, e.g. "fp32 to step 11,000, then bf16 mixed precision (...)"."""
    if not stages:
        return "fp32"
    text = PRECISIONS[stages[0][1]]
    for step, value in stages[1:]:
        text += f" to step {step:,}, then {PRECISIONS[value]}"
    return text


class JsonlLog:
    """Append-only JSON-lines log (one record per line, flushed at once); its folder is created with the
    first record, so a run that fails before it starts leaves nothing behind."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._opened = False

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a record cut short by a crash must not swallow the first record of the resumed run
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        self._opened = True

    def write(self, **record) -> None:
        if not self._opened:
            self._open()
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
    "LOOP_ARG_DESTS",
    "EMA",
    "JsonlLog",
    "LoopOptions",
    "Trainer",
    "TrainingError",
    "add_loop_arguments",
    "atomic_write_json",
    "check_architecture",
    "check_folder",
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
    "parse_with_resume_defaults",
    "psnr",
    "read_options",
    "resolve_device",
    "rng_state",
    "run_loop",
    "save_checkpoint",
    "save_diffusers_fp16",
    "set_rng_state",
    "set_threads",
    "unet2d",
]


# ---------------------------------------------------------------------------------------------
# the work around a trainer's model and loss
# ---------------------------------------------------------------------------------------------


class Trainer:
    """What every trainer does around its own model and loss.

    ``Trainer(run_dir, loop, kind, out_dir)`` checks the loop options, sets the threads, resolves the device,
    checks that the run (and export) folder can be written, refuses to overwrite a checkpoint unless
    ``loop.resume`` and loads the checkpoint to resume from (``resumed``, of ``kind`` if given). It creates
    nothing: the run folder appears with the first log record (:meth:`log_start`).
    :meth:`build_model` seeds torch and builds the model, its EMA, AdamW and the two RNGs, restored from
    the checkpoint on resume; :meth:`optimize` is the optimiser step of ``step_fn``; :meth:`save` writes
    the checkpoint; :meth:`train` runs the loop and logs its end.
    """

    def __init__(self, run_dir, loop: LoopOptions, kind: str | None = None, out_dir=None):
        loop.check()
        set_threads(loop.threads)
        self.loop = loop
        self.device = resolve_device(loop.device)
        self.run_dir = check_folder(run_dir, "--run")
        if out_dir is not None:
            check_folder(out_dir, "--out")
        self.ckpt_path = self.run_dir / CHECKPOINT_NAME
        if not loop.resume and self.ckpt_path.exists():
            raise TrainingError(f"{self.ckpt_path} exists: pass --resume to continue it, or choose another --run")
        self.resumed: dict | None = load_checkpoint(self.ckpt_path, kind) if loop.resume else None
        self.log = JsonlLog(self.run_dir / LOG_NAME)
        self.hardware = hardware_string(self.device, loop.threads)

    def model_config(self, model_cfg: dict) -> dict:
        """The model config this run trains: the checkpoint's on resume, else ``model_cfg``."""
        return self.resumed["model_cfg"] if self.resumed is not None else model_cfg

    def build_model(self, build, model_cfg: dict, *, weight_decay: float = 0.0, init=None) -> nn.Module:
        """``build(**model_cfg)`` on the device (the checkpoint's config on resume; then ``init(model,
        model_cfg)``), with EMA, AdamW and the RNGs, all restored from the checkpoint on resume."""
        loop = self.loop
        torch.manual_seed(loop.seed)
        state, self.resumed = self.resumed, None
        self.model_cfg = state["model_cfg"] if state is not None else model_cfg
        try:
            model = build(**self.model_cfg).to(self.device)
        except TypeError as e:  # a checkpoint's config this trainer does not know
            raise TrainingError(f"{self.ckpt_path}: model config does not fit this trainer ({one_line(e)})") from None
        if init is not None:
            init(model, self.model_cfg)
        self.model = model
        self.ema = EMA(model, loop.ema_decay)
        self.opt = torch.optim.AdamW(model.parameters(), lr=loop.lr, weight_decay=weight_decay)
        self.np_rng = np.random.default_rng(loop.seed)
        self.gen = torch.Generator().manual_seed(loop.seed)
        self.step, self.elapsed = 0, 0.0
        if state is not None:
            try:
                model.load_state_dict(state["model"])
                self.ema.load_state_dict(state["ema"])
                self.opt.load_state_dict(state["opt"])
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise TrainingError(f"{self.ckpt_path}: weights do not fit its model config ({one_line(e)})") from None
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
