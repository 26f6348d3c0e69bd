"""``diffrestore demo``: restore a few real photos with the recommended methods and show the results side by side.

scikit-image's bundled sample photos (no download) are prepared as the evaluation prepares its images,
degraded once per task with the evaluation's seeding, and restored by the task's baseline and every
method through ``restoration.restore_and_score``; PSNR and SSIM are computed on the saved 8-bit PNGs so
every number can be recomputed from the files. docs/demo.md lists the outputs and the rules for priors
that are not trained yet.
"""

from __future__ import annotations

import csv
import io as _io
import math
import platform
import resource
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from diffrestore import demo_columns, image_io, resources, runtime
from diffrestore.demo_columns import Column
from diffrestore.methods import check_frozen_graphs, get_method
from diffrestore.operators.tasks import BASELINE, get_task_spec
from diffrestore.priors.catalog import DEFAULT_PRIORS

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
DEMO_TASKS = ("sr4", "deblur", "denoise", "noisy-sr4")
GRID_CELL_PX = 192
GRID_LABEL_PX = 100
GRID_COL_TITLE_PX = 76  # four lines of a column title
REPORT_TITLE = " --report (the report's comparison)"
DEMO_CSV_FIELDS = ("task", "method", "label", "steps", "options", "n_images", "psnr", "ssim", "seconds_per_image")
METRIC_NOTE = "PSNR (dB) and SSIM against the clean photo, computed on the saved 8-bit PNGs"


class DemoError(ValueError):
    """A user error of the demo (one line, exit status 2)."""


@dataclass
class DemoSpec:
    out: Path
    images: int = 2
    size: int = 256
    methods: list[str] | None = None  # None: every method of the chosen set whose prior is available
    report: bool = False  # the report's comparison (demo_columns.REPORT_COLUMNS) instead of the recommended methods
    tasks: list[str] | None = None
    steps: dict[str, int] = field(default_factory=dict)  # {"*": N} and/or {method: N}
    pixel_prior: str | None = None
    latent_prior: str | None = None
    adm_config: dict | None = None  # ADM hyper-parameters for the pixel prior (--adm-config)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"  # network precision: auto, fp32, bf16, fp16 (runtime.pick_dtype)
    frozen_graphs: bool = False
    progress: bool = True
    max_pixels: int = resources.DEFAULT_MAX_PIXELS  # --size squared may not exceed it
    max_memory: str | None = None  # the memory budget (e.g. "8G"); None: a share of what is available


@dataclass
class DemoPlan:
    spec: DemoSpec
    photos: list[tuple[str, torch.Tensor]]  # (name, (1, 3, size, size) clean image on the CPU)
    tasks: dict  # name -> Task
    columns: list[Column]  # the methods, in order, with their steps and options
    priors: dict  # kind -> prior
    prior_specs: dict[str, str]
    skipped: list[dict]
    started: float

    @property
    def methods(self) -> list[str]:
        return [c.method for c in self.columns]

    @property
    def steps(self) -> dict[str, int]:
        return {c.method: c.steps for c in self.columns}


# --------------------------------------------------------------------------------------------
# preparation: everything that can fail because of the user happens here, before any write
# --------------------------------------------------------------------------------------------


def load_photo(name: str, size: int) -> torch.Tensor:
    """scikit-image sample photo ``name`` as (1, 3, size, size) in [-1, 1], prepared like the
    evaluation images (centre square crop, bilinear resize)."""
    import skimage.data
    from PIL import Image

    from diffrestore.evaluation.data import center_crop_resize

    img = image_io.pil_to_rgb(Image.fromarray(getattr(skimage.data, name)()))
    return image_io.uint8_to_tensor(np.asarray(center_crop_resize(img, size))).unsqueeze(0)


def _builtin_missing(spec: str) -> str | None:
    """For ``builtin:NAME`` whose folder is there but incomplete (still training), why; else None."""
    from diffrestore.priors.catalog import BUILTIN_PREFIX, builtin_dir, list_builtin_priors

    if not spec.startswith(BUILTIN_PREFIX):
        return None
    name = spec[len(BUILTIN_PREFIX) :]
    if not (builtin_dir() / name).is_dir():
        return None  # unknown name: load_prior says so
    notes: list[str] = []
    if any(p.name == name for p in list_builtin_priors(notes)):
        return None
    return next((n for n in notes if f"{name!r}" in n), f"builtin prior {name!r} is incomplete")


def prepare(spec: DemoSpec) -> DemoPlan:
    """Validate the spec, load the priors and the photos. Raises DemoError / ValueError (one line)."""
    from diffrestore.operators.tasks import TASKS as TASK_SPECS
    from diffrestore.operators.tasks import make_task
    from diffrestore.restoration import lcm, prior_multiple, resolve_steps
    from diffrestore.priors.loading import load_prior

    started = time.perf_counter()
    if not 1 <= spec.images <= len(PHOTOS):
        raise DemoError(f"--images must be between 1 and {len(PHOTOS)} (the photos: {', '.join(PHOTOS)}), got {spec.images}")
    if spec.size < 16:
        raise DemoError(f"--size must be at least 16, got {spec.size}")
    resources.check_pixels(spec.size, spec.size, spec.max_pixels, f"--size {spec.size}")
    spec = replace(spec, device=str(resources.resolve_device(spec.device)))
    explicit = spec.methods is not None
    columns = demo_columns.columns(spec.methods, spec.report, spec.steps)  # unknown method / option
    methods = [c.method for c in columns]
    check_frozen_graphs(methods, spec.frozen_graphs)
    task_names = list(dict.fromkeys(spec.tasks)) if spec.tasks is not None else list(DEMO_TASKS)
    tasks = {t: make_task(t, (3, spec.size, spec.size)) for t in task_names}  # unknown task / bad size
    budget = resources.memory_budget(spec.max_memory, spec.device)
    separable = any(TASK_SPECS[t].separable for t in tasks)
    for m in methods:
        resources.check_memory(spec.size, spec.size, budget, kind=get_method(m).prior, separable=separable,
                               what=f"{m} on {spec.size}x{spec.size} photos (--size)")

    given = {"pixel": spec.pixel_prior, "latent": spec.latent_prior}
    prior_specs = {k: given[k] or DEFAULT_PRIORS[k] for k in given}
    priors: dict = {}
    skipped: list[dict] = []
    kinds = [k for k in ("pixel", "latent") if any(get_method(m).prior == k for m in methods)]
    for kind in list(kinds):  # first what is missing (cheap), then load what is there
        missing = _builtin_missing(prior_specs[kind])
        if missing:
            users = [m for m in methods if get_method(m).prior == kind]
            if explicit:
                verb = "needs" if len(users) == 1 else "need"
                raise DemoError(f"{', '.join(users)} {verb} the {kind} prior {prior_specs[kind]}, which is not usable: {missing}")
            skipped += [{"method": m, "prior": prior_specs[kind], "reason": missing} for m in users]
            kinds.remove(kind)
    if not kinds:
        raise DemoError("no method can run: " + "; ".join(sorted({f"{s['prior']}: {s['reason']}" for s in skipped})))
    spec = replace(spec, dtype=runtime.pick_dtype(spec.dtype, spec.device))  # the summary records what ran
    dtype = spec.dtype
    for kind in kinds:
        adm_config = spec.adm_config if kind == "pixel" else None
        priors[kind] = load_prior(
            prior_specs[kind], device=spec.device, dtype=None if dtype == "fp32" else dtype, kind=kind,
            adm_config=adm_config, frozen_graphs=spec.frozen_graphs,
        )  # fmt: skip
    columns = [c for c in columns if get_method(c.method).prior in priors]
    for c in columns:
        m, prior = c.method, priors[get_method(c.method).prior]
        resolve_steps(m, c.steps, prior)
        for t, task in tasks.items():
            factor = max(1, spec.size // task.operator.measurement_shape[-1])
            multiple = lcm(factor, prior_multiple(prior))
            if spec.size % multiple:
                raise DemoError(f"--size {spec.size} does not suit {m} on {t}: the image side must be a multiple of {multiple}")
    photos = [(name, load_photo(name, spec.size)) for name in PHOTOS[: spec.images]]
    return DemoPlan(spec, photos, tasks, columns, priors, prior_specs, skipped, started)


def warn_skipped(plan: DemoPlan) -> None:
    by_prior: dict[tuple[str, str], list[str]] = {}
    for s in plan.skipped:
        by_prior.setdefault((s["prior"], s["reason"]), []).append(s["method"])
    for (prior, reason), methods in by_prior.items():
        kind = get_method(methods[0]).prior
        print(
            f"diffrestore: warning: skipping {', '.join(methods)}: {reason} ({prior}; pass --{kind}-prior SPEC to use another)",
            file=sys.stderr,
        )


# --------------------------------------------------------------------------------------------
# execution
# --------------------------------------------------------------------------------------------


def execute(plan: DemoPlan, written: list[Path]) -> dict:
    """Run every restoration and write the outputs into ``plan.spec.out`` (which must exist and be
    writable). Every file written is appended to ``written``. Returns the summary."""
    from tqdm import tqdm

    spec = plan.spec
    out = Path(spec.out)
    (out / "images").mkdir(exist_ok=True)
    grid_rows: list[dict] = []
    total = len(plan.photos) * len(plan.tasks) * len(plan.methods)
    bar = tqdm(total=total, desc="demo", unit="restoration", disable=not spec.progress, dynamic_ncols=True)
    try:
        for name, x in plan.photos:
            clean_file = _save(out, written, f"{name}_clean.png", x)
            for task_name, task in plan.tasks.items():
                grid_rows.append(_restore_row(plan, name, x, clean_file, task_name, task, written, bar))
    finally:
        bar.close()
    records = [cell for row in grid_rows for cell in row["cells"]]

    table = _table(records, plan)
    image_io.atomic_write_text(out / "metrics.csv", metrics_csv(table))
    written.append(out / "metrics.csv")
    image_io.atomic_write_text(out / "metrics.md", metrics_markdown(table, plan))
    written.append(out / "metrics.md")
    grid = _draw_grid(grid_rows, plan, out / "demo_grid.png")
    written.append(out / "demo_grid.png")
    summary = _summary(plan, records, table, grid, written)
    summary["restorations"] = len(records) - len(grid_rows)
    image_io.atomic_write_json(out / "summary.json", summary)
    written.append(out / "summary.json")
    return summary


def _save(out: Path, written: list[Path], name: str, x: torch.Tensor) -> str:
    """Write ``x`` as ``images/NAME`` (atomically) and return that path, relative to ``out``."""
    image_io.write_image(out / "images" / name, x)
    written.append(out / "images" / name)
    return f"images/{name}"


def _restore_row(plan: DemoPlan, name: str, x: torch.Tensor, clean_file: str, task_name: str, task, written: list[Path],
                 bar) -> dict:  # fmt: skip
    """One grid row: degrade photo ``name`` once for ``task``, then restore it with the baseline and every
    column, scored on the saved 8-bit images; writes their PNGs. The row's ``cells`` are the records."""
    from diffrestore.restoration import Measurement, measure_image, restore_and_score, score_image

    spec, out = plan.spec, Path(plan.spec.out)
    xd = x.to(spec.device)
    y = measure_image(task, x, spec.seed, name).to(spec.device)
    degraded = task.operator.to_image(y)
    row = {"image": name, "task": task_name, "clean": clean_file, "degraded": _save(out, written, f"{name}_{task_name}_degraded.png", degraded)}
    row["degraded_size"] = list(degraded.shape[-2:])
    row["degraded_psnr"] = score_image(degraded, xd, ("psnr",), quantize=True)["psnr"] if degraded.shape == xd.shape else None
    row["cells"] = []
    runs = [(BASELINE, None, 0, {})] + [(c.method, plan.priors[get_method(c.method).prior], c.steps, dict(c.options)) for c in plan.columns]
    for method, prior, steps, options in runs:
        if prior is not None:
            bar.set_postfix_str(f"{name} {task_name} {method}", refresh=True)
        r = restore_and_score(Measurement(xd, y, task, None), method=method, prior=prior, steps=steps, seed=spec.seed,
                              image_id=name, options=options, metrics=("psnr", "ssim"), quantize=True)  # fmt: skip
        rec = {"image": name, "task": task_name, "method": method, "steps": r.steps, "seconds": r.seconds, **r.metrics}
        rec["file"] = _save(out, written, f"{name}_{task_name}_{method}.png", r.x_hat)
        row["cells"].append(rec)
        if prior is not None:
            bar.update(1)
    return row


def _summary(plan: DemoPlan, records: list[dict], table: list[dict], grid: dict, written: list[Path]) -> dict:
    """summary.json: settings, skipped methods, the records, the table, the grid layout, files, times."""
    from diffrestore.restoration import used_options

    spec, out = plan.spec, Path(plan.spec.out)
    return {
        "format": 1,
        "settings": {
            "photos": [n for n, _ in plan.photos],
            "photo_source": "scikit-image sample data (skimage.data), centre-cropped and resized like the evaluation",
            "size": spec.size,
            "seed": spec.seed,
            "tasks": list(plan.tasks),
            "report": spec.report,
            "methods": plan.methods,
            "steps": plan.steps,
            # every option each column ran with: the registry's recommended defaults, then the column's own
            "options": {c.method: used_options(c.method, dict(c.options)) for c in plan.columns},
            "labels": {c.method: demo_columns.label(c) for c in plan.columns},
            "baselines": {t: get_task_spec(t).baseline_description for t in plan.tasks},
            "priors": {k: v for k, v in plan.prior_specs.items() if k in plan.priors},
            **({"adm_config": spec.adm_config} if spec.adm_config is not None and "pixel" in plan.priors else {}),
            "device": str(spec.device),
            "dtype": spec.dtype,
            "frozen_graphs": spec.frozen_graphs,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "metric_convention": METRIC_NOTE + " (metrics.psnr / metrics.ssim with quantize=True)",
        "skipped": plan.skipped,
        "records": records,
        "table": table,
        "grid": grid,
        "files": {
            "grid": "demo_grid.png",
            "metrics_md": "metrics.md",
            "metrics_csv": "metrics.csv",
            "images": sorted({str(p.relative_to(out)) for p in written if p.parent == out / "images"}),
        },
        "restore_seconds": math.fsum(r["seconds"] for r in records),
        "wall_seconds": time.perf_counter() - plan.started,
        "peak_rss_mib": peak_rss_mib(),
    }


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (getrusage ru_maxrss), in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


# --------------------------------------------------------------------------------------------
# table and grid
# --------------------------------------------------------------------------------------------


def _table(records: list[dict], plan: DemoPlan) -> list[dict]:
    """One row per (task, method), averaged over the photos; the baseline first within each task."""
    rows = []
    for task in plan.tasks:
        for method, col in [(BASELINE, None), *((c.method, c) for c in plan.columns)]:
            rs = [r for r in records if r["task"] == task and r["method"] == method]
            n = len(rs)
            rows.append({
                "task": task,
                "method": method,
                "label": demo_columns.label(col) if col else f"baseline: {get_task_spec(task).baseline_description}",
                "steps": rs[0]["steps"],
                "options": demo_columns.format_options(demo_columns.shown_options(col)) if col else "",
                "n_images": n,
                "psnr": math.fsum(r["psnr"] for r in rs) / n,
                "ssim": math.fsum(r["ssim"] for r in rs) / n,
                "seconds_per_image": math.fsum(r["seconds"] for r in rs) / n,
            })  # fmt: skip
    return rows


def metrics_csv(table: list[dict]) -> str:
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(DEMO_CSV_FIELDS), lineterminator="\n")
    w.writeheader()
    for r in table:
        w.writerow({k: r[k] for k in DEMO_CSV_FIELDS})
    return buf.getvalue()


def metrics_markdown(table: list[dict], plan: DemoPlan) -> str:
    spec = plan.spec
    lines = [
        "# diffrestore demo",
        "",
        f"- photos: {', '.join(n for n, _ in plan.photos)} (scikit-image samples), {spec.size}x{spec.size}, seed {spec.seed}",
        "- priors: " + ", ".join(f"{k} `{v}`" for k, v in plan.prior_specs.items() if k in plan.priors),
        f"- {METRIC_NOTE}; mean over {len(plan.photos)} photo(s); time: the method alone, seconds per image on {spec.device}",
    ]
    lines.append(f"- {demo_columns.baseline_note(list(plan.tasks))}")
    for c in plan.columns:
        why = demo_columns.failure(c)
        if why:
            lines.append(f"- {demo_columns.label(c)}: expected to fail{' (the report found it)' if c.report else ''}: {why[1]}")
    if plan.skipped:
        lines.append("- skipped: " + "; ".join(f"{s['method']} ({s['reason']})" for s in plan.skipped))
    lines += [
        "",
        "| Task | Method | Steps | Options | PSNR (dB) | SSIM | Time per image (s) |",
        "|:--|:--|--:|:--|--:|--:|--:|",
    ]
    for r in table:
        steps, opts = ("—", "—") if r["method"] == BASELINE else (str(r["steps"]), r["options"] or "defaults")
        lines.append(f"| {r['task']} | {r['label']} | {steps} | {opts} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['seconds_per_image']:.3g} |")
    return "\n".join(lines) + "\n"


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _draw_grid(rows: list[dict], plan: DemoPlan, path: Path) -> dict:
    """demo_grid.png from the saved PNGs (what is shown is what was scored)."""
    from diffrestore.figures import draw_image_grid

    out = Path(plan.spec.out)
    columns = ["clean", "degraded", BASELINE, *plan.methods]
    titles = ["clean", "degraded", demo_columns.baseline_title(list(plan.tasks))] + [demo_columns.title(c) for c in plan.columns]
    cells, captions, bold = [], [], set()
    for r, row in enumerate(rows):
        scored = row["cells"]  # baseline, then the methods
        h, w = row["degraded_size"]
        deg = f"{row['degraded_psnr']:.2f} dB" if row["degraded_psnr"] is not None else f"input {w}x{h}"
        cells.append([_read_png(out / row["clean"]), _read_png(out / row["degraded"])] + [_read_png(out / c["file"]) for c in scored])
        base = f"{get_task_spec(row['task']).baseline_description}: {scored[0]['psnr']:.2f} dB"
        captions.append(["reference", deg, base] + [f"{c['psnr']:.2f} dB" for c in scored[1:]])
        best = max(range(len(scored)), key=lambda k: scored[k]["psnr"])
        bold.add((r, 2 + best))
    labels = [f"{row['image']}\n{row['task']}" for row in rows]
    geo = draw_image_grid(
        path,
        cells,
        col_titles=titles,
        row_labels=labels,
        captions=captions,
        bold=bold,
        title=f"diffrestore demo{REPORT_TITLE if plan.spec.report else ''}: PSNR against the clean photo (best of each row "
        f"in bold), {plan.spec.size}x{plan.spec.size}",
        cell_px=GRID_CELL_PX,
        label_px=GRID_LABEL_PX,
        col_title_px=GRID_COL_TITLE_PX,
    )
    return {
        "file": path.name,
        "rows": [[row["image"], row["task"]] for row in rows],
        "columns": columns,
        "titles": titles,
        "captions": captions,
        "size_px": list(geo.size),
        "cell_px": geo.cell,
    }


def print_results(summary: dict, out: Path) -> None:
    print((out / "metrics.md").read_text(), end="")
    print()
    print(f"results in {out}/:")
    print(f"  {out / 'demo_grid.png'}  (rows: photo x task; columns: clean, degraded, baseline, methods)")
    print(f"  {out / 'metrics.md'}, {out / 'metrics.csv'}, {out / 'summary.json'}")
    print(f"  {out / 'images'}/  ({len(summary['files']['images'])} PNGs)")
    for s in summary["skipped"]:
        print(f"  skipped {s['method']}: {s['reason']}")
    print(f"wall time {summary['wall_seconds']:.1f} s, peak memory {summary['peak_rss_mib']:.0f} MiB")
