"""The training loop: steps until done, out of time or signalled, with periodic checkpoints and log records."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from .checkpoints import TrainingError

if TYPE_CHECKING:
    from .common import JsonlLog


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
