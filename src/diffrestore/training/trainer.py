"""The work every trainer does around its own model and loss (:class:`Trainer`)."""

from __future__ import annotations

import platform

import numpy as np
import torch
from torch import nn

from .checkpoints import (
    CHECKPOINT_NAME,
    TrainingError,
    load_run_checkpoint,
    one_line,
    rng_state,
    save_run_checkpoint,
    set_rng_state,
)
from .loop import (
    EMA,
    LOG_NAME,
    JsonlLog,
    describe_lr,
    describe_precision,
    lr_at,
    lr_stages,
    option_stages,
    round_floats,
    run_loop,
)
from .networks import param_count
from .options import LoopOptions, check_folder, training_device


def set_threads(threads: int) -> None:
    """Intra-op threads for this run; one inter-op thread (trainers run one model at a time)."""
    torch.set_num_threads(max(1, int(threads)))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (or parallel work already started)
        pass


def hardware_string(device: torch.device, threads: int) -> str:
    """The device a run trains on, for the model README (GPU name, or CPU model, threads and torch version)."""
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
        self.device = training_device(loop.device)
        self.run_dir = check_folder(run_dir, "--run")
        if out_dir is not None:
            check_folder(out_dir, "--out")
        self.ckpt_path = self.run_dir / CHECKPOINT_NAME
        if not loop.resume and self.ckpt_path.exists():
            raise TrainingError(f"{self.ckpt_path} exists: pass --resume to continue it, or choose another --run")
        self.resumed: dict | None = load_run_checkpoint(self.ckpt_path, kind) if loop.resume else None
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
        save_run_checkpoint(
            self.ckpt_path,
            {
                "kind": kind, "model_cfg": self.model_cfg, "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "opt": self.opt.state_dict(), "rng": rng_state(self.np_rng, self.gen),
                "step": step, "elapsed": elapsed, "options": options, **extra,
            },
        )

    def save_and_validate(self, step: int, elapsed: float, kind: str, options: dict, val: dict, validate=None,
                          **extra) -> None:
        """:meth:`save`, then ``val`` replaced by ``validate()`` (none if ``validate`` is None) and the
        "checkpoint" log record with those values (rounded to 5 digits)."""
        self.save(step, elapsed, kind, options, **extra)
        val.clear()
        if validate is not None:
            val.update(validate())
        self.log.write(event="checkpoint", step=step, elapsed=round(elapsed, 1), **round_floats(val, 5))

    def optimiser_summary(self) -> str:
        """One line for a model recipe: AdamW with this run's learning-rate history, batch, clip, EMA, arithmetic."""
        loop = self.loop
        return (f"AdamW {self.lr_schedule()}, batch {loop.batch}, clip {loop.grad_clip:g}, EMA {loop.ema_decay}; "
                f"{self.precision_history()}")

    def train(self, step_fn, checkpoint_fn, desc: str, ndigits: int = 6, val: dict | None = None) -> dict:
        """:func:`run_loop` with these options, then a "stop" log record (floats rounded to ``ndigits``);
        the result holds a copy of ``val`` (the last validation) as "val" if given."""
        loop = self.loop
        result = run_loop(
            start_step=self.step, steps=loop.steps, elapsed_before=self.elapsed, step_fn=step_fn,
            checkpoint_fn=checkpoint_fn, log=self.log, log_every=loop.log_every, ckpt_every_s=loop.ckpt_every_s,
            ckpt_every_steps=loop.ckpt_every_steps, max_minutes=loop.max_minutes, progress=loop.progress,
            progress_interval=loop.progress_interval, desc=desc,
        )
        self.log.write(event="stop", **round_floats(result, ndigits))
        if val is not None:
            result["val"] = dict(val)
        return result
