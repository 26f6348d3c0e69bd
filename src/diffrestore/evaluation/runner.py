"""Running an evaluation: compute the missing records, measure throughput, write the report.

Randomness and order
--------------------
For each (task, image) the clean image is degraded once with a generator seeded from
``image_seed(seed, image_id + '#measurement')``; every method sees that ``y``. Each restoration
uses ``image_seed(seed, image_id)``. Records are computed one image per call, so a record never
depends on the rank, batch, order or resume point; aggregation sorts records first.

Resume
------
Rerunning the same command computes only the (method, task, steps, image) records and the
throughput cells that are missing; a finished run loads no model and only rewrites the tables.

Sharding
--------
``torchrun --nproc_per_node=K -m diffrestore evaluate ...`` or ``--nproc K`` (K local processes
spawned with torch.multiprocessing): rank r takes images ``i % K == r``; all ranks append to the
one ``records.jsonl``. After a barrier rank 0 measures throughput and writes the report, which
reads the sorted records, so the tables equal a single process's.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from diffrestore import image_io
from diffrestore.errors import EvalError
from diffrestore.evaluation import report, seams
from diffrestore.evaluation.data import load_eval_image
from diffrestore.evaluation.distributed import Dist, from_env, launched_by_torchrun, spawn
from diffrestore.evaluation.plan import EvalSpec, Plan, prepare
from diffrestore.evaluation.store import (
    FIG6_SNAPSHOTS,
    FIGURE_IMAGES,
    all_cells,
    append_line,
    cell_dir,
    discard_if_empty,
    image_name,
    open_run,
    read_jsonl,
    read_records,
    record_key,
    save_array,
    save_png,
)
from diffrestore.methods import get_method
from diffrestore.metrics.quality import full_reference
from diffrestore.operators.tasks import BASELINE, make_task
from diffrestore.priors.base import LatentSRPrior, PixelPrior
from diffrestore.restoration import (
    Measurement, image_seed, lcm, measure_image, prior_multiple, resolve_steps, restore_and_score, run_method,
)


def _prior_kind(prior) -> str:
    """"latent" or "pixel": which of the two prior contracts ``prior`` implements (tiled and frozen
    wrappers included)."""
    if isinstance(prior, LatentSRPrior):
        return "latent"
    if isinstance(prior, PixelPrior):
        return "pixel"
    raise EvalError(f"{type(prior).__name__} is neither a PixelPrior nor a LatentSRPrior")


class _Resources:
    """Models and tasks of one process, loaded when first needed (a finished run loads nothing)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.priors: dict = {}
        self.tasks: dict = {}
        self.extractor = None
        self.features_reason: str | None = None
        self._features_tried = False

    def task(self, name: str):
        if name not in self.tasks:
            size = self.plan.settings["size"]
            self.tasks[name] = make_task(name, (3, size, size))
        return self.tasks[name]

    def priors_for(self, method: str, task: str) -> dict:
        kind = get_method(method).prior
        if kind not in self.priors:
            spec = self.plan.settings[f"{kind}_prior"]
            adm = self.plan.settings.get("adm_config") if kind == "pixel" else None
            args = (spec, self.plan.device, self.plan.settings["dtype"], kind)
            extra = {"adm_config": adm} if adm else {}  # plugins' load_eval_prior may take neither
            if self.plan.settings.get("frozen_graphs"):
                extra["frozen_graphs"] = True
            prior = seams.load_eval_prior(*args, **extra)
            got = _prior_kind(prior)
            if got != kind:
                raise EvalError(f"--{kind}-prior {spec} is a {got} prior")
            self.priors[kind] = prior
        op = self.task(task).operator
        size = self.plan.settings["size"]
        multiple = lcm(max(1, size // op.measurement_shape[-1]), prior_multiple(self.priors[kind]))
        if size % multiple:
            raise EvalError(f"--size {size} does not suit {method} on {task}: image sides must be multiples of {multiple}")
        return self.priors

    def features(self):
        if not self._features_tried:
            self._features_tried = True
            try:
                self.extractor = seams.load_feature_extractor(self.plan.device)
            except seams.FeaturesUnavailable as e:
                self.features_reason = str(e)
            image_io.atomic_write_json(
                self.plan.run / "inception.json", {"available": self.extractor is not None, "reason": self.features_reason}
            )
        return self.extractor

    def measure(self, task_name: str, x: torch.Tensor, image_id: str) -> torch.Tensor:
        """y of one clean CPU image (1, C, H, W), drawn on the CPU, on the run device: the same for every
        method, rank and resume point."""
        return measure_image(self.task(task_name), x, self.plan.settings["seed"], image_id).to(self.plan.device)


def _snapshot(info) -> tuple[int, float, torch.Tensor, torch.Tensor]:
    """(step, t, x_t, x0) of image 0 from a method's ``StepInfo`` (see ``methods.common``)."""
    t = float(torch.as_tensor(info["t"]).reshape(-1)[0])
    return int(info["i"]), t, info["x_t"][0].detach().float().cpu().half(), info["x0"][0].detach().float().cpu().half()


def _bars(plan: Plan, dist: Dist, todo: list[tuple[int, str, list]]):
    from tqdm import tqdm

    enabled = plan.progress and dist.is_main
    per_method: dict[str, int] = {}
    for _, _, cells in todo:
        for m, _s in cells:
            per_method[m] = per_method.get(m, 0) + 1
    suffix = f" (rank 0 of {dist.world})" if dist.world > 1 else ""
    total = tqdm(total=sum(per_method.values()), desc="grid" + suffix, unit="rec", disable=not enabled, position=0)
    bars = {
        m: tqdm(total=k, desc=f"  {m}", unit="img", disable=not enabled, position=i + 1, leave=False)
        for i, (m, k) in enumerate(per_method.items())
    }
    return total, bars


def missing_work(plan: Plan, dist: Dist) -> list[tuple[int, str, list[tuple[str, int]]]]:
    """(image index, task, missing (method, steps) cells) of this rank's records still to compute."""
    grid, files = plan.grid, plan.files
    done = {record_key(r) for r in read_records(plan.run)}
    cells: dict[str, list[tuple[str, int]]] = {}
    for t, m, s in all_cells(grid):
        cells.setdefault(t, []).append((m, s))
    todo = []
    for i in range(dist.rank, len(files), dist.world):
        for t in grid["tasks"]:
            missing = [(m, s) for m, s in cells[t] if (t, m, s, files[i]) not in done]
            if missing:
                todo.append((i, t, missing))
    return todo


def preflight(plan: Plan, todo: list, res: _Resources) -> None:
    """Fail before any model call (and, called from ``evaluate``, before the run folder is written) when a
    task, prior, image size or step count of the missing work cannot run: loads the priors it needs."""
    for t in plan.grid["tasks"]:
        res.task(t)
    for _, t, missing in todo:
        for m, steps in missing:
            if m != BASELINE:
                priors = res.priors_for(m, t)
                try:
                    resolve_steps(m, steps, priors[get_method(m).prior])
                except ValueError as e:
                    raise EvalError(f"--steps: {e}") from None


def run_records(plan: Plan, dist: Dist, res: _Resources) -> int:
    """Compute this rank's missing records. Returns how many were written."""
    run, settings, grid, files = plan.run, plan.settings, plan.grid, plan.files
    todo = missing_work(plan, dist)
    if not todo:
        return 0
    preflight(plan, todo, res)  # done before the run folder was written; cached, so free here
    probe = full_reference(torch.zeros(1, 3, settings["size"], settings["size"]), torch.full((1, 3, settings["size"], settings["size"]), 0.5))
    if "lpips_note" in probe and dist.is_main:
        print(f"diffrestore: LPIPS left out: {probe['lpips_note']}", file=sys.stderr)
    extract = res.features()

    seed, size = settings["seed"], settings["size"]
    total_bar, method_bars = _bars(plan, dist, todo)
    written = 0
    current = (None, None, None)  # (index, clean image on the CPU, on the device)
    try:
        for i, task_name, missing in todo:
            image_id, name = files[i], image_name(i, len(files))
            keep = plan.save_images or i < FIGURE_IMAGES
            if current[0] != i:
                x = load_eval_image(plan.data / image_id, size, plan.max_pixels).unsqueeze(0)
                current = (i, x, x.to(plan.device))
                clean_feat = run / "features" / "clean" / f"{name}.npy"
                if extract is not None and not clean_feat.exists():
                    save_array(clean_feat, a=extract(current[2])[0])
                if keep and not (run / "images" / "clean" / f"{name}.png").exists():
                    save_png(run / "images" / "clean" / f"{name}.png", x)
            _, x, xd = current
            task = res.task(task_name)
            y = res.measure(task_name, x, image_id)
            if keep and not (run / "images" / task_name / "degraded" / f"{name}.png").exists():
                save_png(run / "images" / task_name / "degraded" / f"{name}.png", task.operator.to_image(y))
            for method, steps in missing:
                snaps: list = []
                callback = None
                if i == 0 and task_name == grid["figure_task"] and method != BASELINE and steps == grid["steps"].get(method):

                    def callback(info, _snaps=snaps):
                        _snaps.append(_snapshot(info))

                prior = None if method == BASELINE else res.priors_for(method, task_name)[get_method(method).prior]
                r = restore_and_score(
                    Measurement(xd, y, task, None), method=method, prior=prior, steps=steps, seed=seed, image_id=image_id,
                    options=grid.get("options", {}).get(method, {}), callback=callback, tile=settings.get("tile"),
                    overlap=settings.get("overlap"),
                )  # fmt: skip
                x_hat = r.x_hat
                record = {"task": task_name, "method": method, "steps": steps, "image_id": image_id, "index": i, **r.metrics}
                if r.spread is not None:  # samples > 1: how far the draws spread, and where
                    record.update(sample_std=r.spread["mean"], std_error_correlation=r.spread["error_correlation"])
                record.update(consistency=r.consistency, seconds=r.seconds)
                where = cell_dir(task_name, method, steps)
                if extract is not None:
                    save_array(run / "features" / where / f"{name}.npy", a=extract(x_hat)[0])
                    record["features"] = f"features/{where}/{name}.npy"
                if keep:
                    save_png(run / "images" / where / f"{name}.png", x_hat)
                    record["image"] = f"images/{where}/{name}.png"
                if snaps:
                    pick = sorted({round(j) for j in np.linspace(0, len(snaps) - 1, min(len(snaps), FIG6_SNAPSHOTS))})
                    chosen = [snaps[j] for j in pick]
                    save_array(
                        run / "intermediates" / f"{where}.npz",
                        step=np.array([c[0] for c in chosen]),
                        t=np.array([c[1] for c in chosen]),
                        x_t=torch.stack([c[2] for c in chosen]).numpy(),
                        x0=torch.stack([c[3] for c in chosen]).numpy(),
                    )
                append_line(run / "records.jsonl", record)
                written += 1
                total_bar.update(1)
                method_bars[method].update(1)
    finally:
        for b in method_bars.values():
            b.close()
        total_bar.close()
    return written


def measure_throughput(plan: Plan, res: _Resources) -> int:
    """Samples/s of each (task, method, steps) cell: one warm-up call, then one timed batch."""
    from tqdm import tqdm

    settings, grid, run = plan.settings, plan.grid, plan.run
    have = {
        (r.get("task"), r.get("method"), r.get("steps"), r.get("batch_size"), r.get("device"))
        for r in read_jsonl(run / "throughput.jsonl")
    }
    cells = [c for c in all_cells(grid) if c[1] != BASELINE and (*c, plan.batch_size, plan.device) not in have]
    if not cells:
        return 0
    batch = [plan.files[j % len(plan.files)] for j in range(plan.batch_size)]
    ys: dict[str, torch.Tensor] = {}
    bar = tqdm(cells, desc="throughput", unit="cell", disable=not plan.progress)
    for task_name, method, steps in bar:
        priors = res.priors_for(method, task_name)
        if task_name not in ys:
            clean = [load_eval_image(plan.data / f, settings["size"], plan.max_pixels).unsqueeze(0) for f in batch]
            ys[task_name] = torch.cat([res.measure(task_name, x, f) for x, f in zip(clean, batch)])
        seed = image_seed(settings["seed"], "#throughput")
        task = res.task(task_name)
        options = {**grid.get("options", {}).get(method, {}), "tile": settings.get("tile"), "overlap": settings.get("overlap")}
        run_method(method, priors, task, ys[task_name], steps=min(steps, 2), seed=seed, **options)  # warm-up
        seconds = run_method(method, priors, task, ys[task_name], steps=steps, seed=seed, **options).seconds
        append_line(
            run / "throughput.jsonl",
            {
                "task": task_name,
                "method": method,
                "steps": steps,
                "batch_size": plan.batch_size,
                "device": plan.device,
                "dtype": settings["dtype"],
                "frozen_graphs": settings.get("frozen_graphs", False),
                "seconds": seconds,
                "samples_per_s": plan.batch_size / seconds if seconds > 0 else float("inf"),
            },
        )
    return len(cells)


def execute(plan: Plan, dist: Dist, res: _Resources | None = None) -> None:
    """Every rank: its records; then rank 0: throughput and the report. ``res``: the models and tasks
    :func:`preflight` already loaded, if any."""
    res = res or _Resources(plan)
    err = None
    try:
        run_records(plan, dist, res)
    except Exception as e:  # every rank must reach agree(), or the others would wait forever
        err = e
    dist.agree(err)
    if dist.is_main:
        measure_throughput(plan, res)
        report.write_report(plan.run)


def _rank_device(plan: Plan, dist: Dist) -> Plan:
    """One GPU per local rank when there are several."""
    if plan.device.startswith("cuda") and torch.cuda.device_count() > 1:
        return replace(plan, device=f"cuda:{dist.local_rank % torch.cuda.device_count()}")
    return plan


def _worker(dist: Dist, plan: Plan) -> None:
    """Entry of a process spawned by --nproc."""
    seams.load_plugins()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world))
    execute(_rank_device(plan, dist), dist)


def evaluate(spec: EvalSpec) -> Path:
    """Run (or resume, or extend) an evaluation; returns the run folder."""
    seams.load_plugins()
    if launched_by_torchrun():
        if spec.nproc > 1:
            raise EvalError("--nproc cannot be combined with torchrun (torchrun already starts the processes)")
        dist = from_env()
        try:
            _evaluate_in_group(spec, dist)
        finally:
            dist.close()
        return Path(spec.out)
    plan = prepare(spec)
    res = _Resources(plan)
    preflight(plan, [w for r in range(spec.nproc) for w in missing_work(plan, Dist(r, spec.nproc))], res)
    lock, created = open_run(plan)
    try:
        if spec.nproc > 1:
            del res  # each worker loads its own models
            spawn(_worker, spec.nproc, plan)
        else:
            execute(plan, Dist(), res)
    except BaseException:
        discard_if_empty(plan, created)
        raise
    finally:
        lock.release()
    return plan.run


def _evaluate_in_group(spec: EvalSpec, dist: Dist) -> None:
    plan = err = res = None
    try:
        plan = _rank_device(prepare(spec), dist)
        res = _Resources(plan)
        preflight(plan, missing_work(plan, dist), res)
    except Exception as e:
        err = e
    dist.agree(err)
    lock, created = None, False
    if dist.is_main:
        try:
            lock, created = open_run(plan)
        except Exception as e:
            err = e
    dist.agree(err)
    try:
        execute(plan, dist, res)
    except BaseException:
        if dist.is_main:
            discard_if_empty(plan, created)
        raise
    finally:
        if lock is not None:
            lock.release()
