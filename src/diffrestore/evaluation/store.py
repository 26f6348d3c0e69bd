"""The run folder of ``diffrestore evaluate``: its files, its lock, and the append-only records.

Files in RUN
------------
``config.json``      ``settings`` (what the numbers depend on: data folder, hash of the chosen
                     files, n, seed, size, prior specs, dtype, device type), ``grid`` (tasks, methods,
                     table steps per method, Figure 7 step sweeps, the figure task) and
                     ``last_invocation`` (device, batch size, ... informational).
``files.txt``        the chosen images, paths relative to the data folder, in index order.
``skipped.json``     with ``--skip-bad``: the chosen images that could not be used (file, reason); they
                     are left out of ``files.txt``.
``records.jsonl``    one JSON object per line and per (method, task, steps, image): ``task, method,
                     steps, image_id, index, psnr, psnr_y, ssim, lpips`` (or ``lpips_note`` when
                     its weights are missing), ``consistency`` (= ||H x_hat - y||), ``seconds`` and,
                     when stored, ``features`` / ``image`` (paths relative to RUN). The task baseline
                     has ``method "baseline"``, ``steps 0``; every grid has it. Append-only; each line
                     is written with one ``os.write`` on an ``O_APPEND`` fd and fsynced, so concurrent
                     ranks never interleave. Readers skip a line that does not parse (a writer killed
                     mid-line) and keep the first of duplicates.
``throughput.jsonl`` one line per (method, task, steps): batch size, device, dtype, seconds and
                     samples/s of the method alone on one batch (after one warm-up call).
``features/``        Inception pool features, float32 ``(2048,)`` ``.npy`` per image:
                     ``clean/IDX.npy`` and ``TASK/METHOD-STEPS/IDX.npy`` (written atomically,
                     before the record that names them). ``inception.json`` says whether the
                     network was available and, if not, why (the FID column's n/a text).
``images/``          PNGs: ``clean/IDX.png``, ``TASK/degraded/IDX.png``, ``TASK/METHOD-STEPS/IDX.png``
                     for the first ``FIGURE_IMAGES`` images (Figure 4), for all with --save-images.
``intermediates/``   ``TASK/METHOD-STEPS.npz`` (step, t, x_t, x0 snapshots, float16) of image 0 on
                     the figure task at the table steps (Figure 6).
``tables.md``, ``tables.csv``, ``results.json``, ``fig4_grid.png``, ``fig6_intermediates.png``,
``fig7_fid_throughput.png``, ``fig7.csv``, ``fid_cache.json``  written by
                     :mod:`diffrestore.evaluation.report`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from diffrestore import image_io
from diffrestore.errors import EvalError
from diffrestore.operators.tasks import BASELINE

if TYPE_CHECKING:
    from diffrestore.evaluation.plan import Plan

#: images (by index) whose clean / degraded / restored PNGs are always kept, for Figure 4
FIGURE_IMAGES = 2
#: x_t snapshots kept per method for Figure 6
FIG6_SNAPSHOTS = 8


# --------------------------------------------------------------------------------------------
# The folder and its lock
# --------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive flock on RUN/.lock, held by the process that owns the run while it is written."""

    def __init__(self, run: Path):
        self.fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise EvalError(f"{run} is being written by another `diffrestore evaluate`") from None

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def open_run(plan: Plan) -> tuple[RunLock, bool]:
    """Create / claim the run folder and write config.json and files.txt. Returns (lock, created)."""
    run = plan.run
    created = image_io.prepare_output_dir(run)
    lock = RunLock(run)
    try:
        if plan.fresh:
            image_io.atomic_write_text(run / "files.txt", "".join(f + "\n" for f in plan.files))
        if plan.skipped:
            image_io.atomic_write_json(run / "skipped.json", plan.skipped)
        image_io.atomic_write_json(run / "config.json", plan.config)
        for name in ("records.jsonl", "throughput.jsonl"):
            repair_tail(run / name)
    except BaseException:
        lock.release()
        if created:  # nothing of a run was written yet
            shutil.rmtree(run, ignore_errors=True)
        raise
    return lock, created


def discard_if_empty(plan: Plan, created: bool) -> None:
    """After a failure: remove what a *new* run wrote, as long as no record was written."""
    if not plan.fresh or (plan.run / "records.jsonl").exists():
        return
    if created:
        shutil.rmtree(plan.run, ignore_errors=True)
    else:  # the folder was empty before (prepare refuses anything else)
        for p in plan.run.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Records: append-only JSON lines
# --------------------------------------------------------------------------------------------


def append_line(path: Path, obj: dict) -> None:
    """Append one JSON line with a single write on an O_APPEND descriptor, then fsync."""
    data = (json.dumps(obj, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path} ({written} of {len(data)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_tail(path: Path) -> None:
    """End a line cut by a killed writer, so the next append starts on a line of its own."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
        if last != b"\n":
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """Every complete JSON object line of ``path`` (lines that do not parse are skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def record_key(r: dict) -> tuple:
    return (r["task"], r["method"], int(r["steps"]), r["image_id"])


#: fields of a record and their types; a line that parses but breaks these is left out with a warning
RECORD_FIELDS = {"task": str, "method": str, "steps": int, "image_id": str, "index": int}
RECORD_NUMBERS = ("psnr", "ssim", "lpips", "consistency", "seconds", "sample_std", "std_error_correlation")


def well_formed(r: dict) -> bool:
    """Whether a parsed record has every key field with its type and numbers where numbers belong."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    return (
        all(isinstance(r.get(k), t) and not isinstance(r.get(k), bool) for k, t in RECORD_FIELDS.items())
        and all(number(r[k]) for k in RECORD_NUMBERS if k in r)
        and all(isinstance(r[k], str) for k in ("features", "image") if k in r)
    )


def read_records(run: Path, warn: bool = False) -> list[dict]:
    """The run's records, first of any duplicates, sorted by (task, method, steps, index). Lines that parse
    but are not records (a field missing or of the wrong type) are left out, with one warning line on
    stderr when ``warn``; lines that do not parse (a writer killed mid-line) are left out silently."""
    seen: dict[tuple, dict] = {}
    bad = 0
    for r in read_jsonl(Path(run) / "records.jsonl"):
        if not well_formed(r):
            bad += 1
            continue
        seen.setdefault(record_key(r), r)
    if bad and warn:
        print(f"diffrestore: warning: left out {bad} malformed record(s) of {Path(run) / 'records.jsonl'}", file=sys.stderr)
    return sorted(seen.values(), key=lambda r: (r["task"], r["method"], r["steps"], r["index"]))


# --------------------------------------------------------------------------------------------
# Cells of the grid and where their files go
# --------------------------------------------------------------------------------------------


def table_cells(grid: dict) -> list[tuple[str, str, int]]:
    """(task, method, steps) of the tables, baseline first, in grid order."""
    return [(t, m, s) for t in grid["tasks"] for m, s in [(BASELINE, 0)] + [(m, grid["steps"][m]) for m in grid["methods"]]]


def sweep_cells(grid: dict) -> list[tuple[str, str, int]]:
    return [(grid["figure_task"], m, s) for m, steps in grid["fig7_steps"].items() for s in steps]


def all_cells(grid: dict) -> list[tuple[str, str, int]]:
    return list(dict.fromkeys(table_cells(grid) + sweep_cells(grid)))


def cell_dir(task: str, method: str, steps: int) -> str:
    return f"{task}/{method}-{steps}"


def image_name(index: int, n_images: int) -> str:
    """File stem of image ``index`` under images/, features/ (zero-padded, sorts in index order)."""
    return f"{index:0{max(5, len(str(n_images - 1)))}d}"


def save_array(path: Path, **arrays) -> None:
    """Atomically write one array (.npy, key ``a``) or several (.npz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with image_io.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            if path.suffix == ".npz":
                np.savez(f, **arrays)
            else:
                np.save(f, arrays["a"])
            f.flush()
            os.fsync(f.fileno())


def save_png(path: Path, x: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_io.write_image(path, x)
