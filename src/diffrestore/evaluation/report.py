"""Tables 1-4 and Figures 4, 6, 7 of an evaluation run, rebuilt from what the run stored.

Nothing here runs a model: numbers come from ``records.jsonl``, ``features/`` (FID, KID) and
``throughput.jsonl``, the pictures from ``images/`` and ``intermediates/`` (the layout is in
:mod:`diffrestore.evaluation.store`). Records are sorted and averaged with ``math.fsum``, so the
tables do not depend on the order records were written in (resume points, ranks).

Outputs (in RUN): ``results.json`` (everything), ``tables.md`` (one table per task, baseline
first; see :mod:`diffrestore.evaluation.tables`), ``tables.csv``, ``fig4_grid.png``,
``fig6_intermediates.png``, ``fig7_fid_throughput.png`` and its data ``fig7.csv``; ``fid_cache.json``
keeps FID/KID per cell under a digest of the features they came from (a stale entry is recomputed).

A metric that cannot be computed says why (``n/a (...)``); no number is made up. Timing fields
(``seconds_per_image`` and ``throughput_*``) are the only ones that differ between two runs of the
same grid.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import textwrap
from pathlib import Path

import numpy as np

from diffrestore import image_io
from diffrestore.errors import EvalError
from diffrestore.evaluation.plan import read_config
from diffrestore.evaluation.store import FIGURE_IMAGES, cell_dir, image_name, read_jsonl, read_records, sweep_cells, table_cells
from diffrestore.evaluation.tables import method_label, tables_markdown, to_csv
from diffrestore.figures import draw_image_grid, read_png, save_figure, show_image

# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


class _Features:
    """Per-image feature files of the run, loaded on demand, and FID/KID computed from them.

    FID (a 2048x2048 sqrtm) and KID (100 subsets) take seconds per cell, so they are cached in
    ``fid_cache.json`` under a digest of the exact feature arrays they were computed from.
    """

    def __init__(self, run: Path, n_files: int):
        self.run, self.n = run, n_files
        self._clean = None
        self.cache_path = run / "fid_cache.json"
        try:
            self.cache = json.loads(self.cache_path.read_text()) if self.cache_path.exists() else {}
        except ValueError:
            self.cache = {}
        self.dirty = False

    def fid_kid(self, key: tuple, restored: np.ndarray, clean: np.ndarray):
        h = hashlib.sha256()
        for a in (restored, clean):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
        name, digest = "/".join(map(str, key)), h.hexdigest()
        hit = self.cache.get(name)
        if hit and hit.get("digest") == digest:
            return hit["fid"], hit["kid"], None
        fid, kid, note = _fid_kid(restored, clean)
        if note is None:
            self.cache[name] = {"digest": digest, "fid": fid, "kid": kid}
            self.dirty = True
        return fid, kid, note

    def save_cache(self) -> None:
        if self.dirty:
            image_io.atomic_write_json(self.cache_path, self.cache)
            self.dirty = False

    def clean(self) -> np.ndarray | None:
        if self._clean is None:
            paths = [self.run / "features" / "clean" / f"{image_name(i, self.n)}.npy" for i in range(self.n)]
            self._clean = np.stack([np.load(p) for p in paths]) if all(p.exists() for p in paths) else False
        return None if self._clean is False else self._clean

    def of(self, records: list[dict]) -> np.ndarray | None:
        paths = [self.run / r["features"] for r in records if r.get("features")]
        if len(paths) != len(records) or not all(p.exists() for p in paths):
            return None
        return np.stack([np.load(p) for p in paths])


def _features_reason(run: Path) -> str:
    path = run / "inception.json"
    if path.exists():
        try:
            status = json.loads(path.read_text())
            if not status.get("available") and status.get("reason"):
                return status["reason"]
        except ValueError:
            pass
    return "Inception features missing"


def _fid_kid(restored: np.ndarray, clean: np.ndarray) -> tuple[float | None, float | None, str | None]:
    try:
        metrics = importlib.import_module("diffrestore.metrics.quality")
    except ImportError as e:
        return None, None, f"n/a (diffrestore.metrics.quality is not available: {e})"
    if min(len(restored), len(clean)) < 2:
        return None, None, "n/a (FID needs at least 2 images)"
    try:
        fid = float(metrics.fid_from_features(restored, clean))
    except ValueError as e:
        return None, None, f"n/a ({str(e).splitlines()[0]})"
    try:
        kid = metrics.kernel_inception_distance(restored, clean)
        kid = float(kid[0] if isinstance(kid, (tuple, list)) else kid)
    except ValueError:
        kid = None
    return fid, kid, None


def _mean(records: list[dict], key: str) -> float | None:
    if not records or not all(key in r for r in records):
        return None
    return math.fsum(float(r[key]) for r in records) / len(records)


def _lpips_note(records: list[dict]) -> str:
    """Why a cell has no LPIPS: the records' own note (weights missing: how to get them), or that
    some records were written without it (a run resumed across versions)."""
    missing = [r for r in records if "lpips" not in r]
    note = next((r["lpips_note"] for r in missing if r.get("lpips_note")), None)
    if note and len(missing) == len(records):
        return note
    reason = note[len("n/a (") : -1] if note and note.startswith("n/a (") and note.endswith(")") else note
    reason = reason or "not recorded by this run's version of diffrestore"
    if len(missing) < len(records):
        return f"n/a ({len(missing)} of {len(records)} images lack it: {reason})"
    return f"n/a ({reason})"


def _row(key, records, n_total, feats: _Features, reason: str, throughput: dict) -> dict:
    task, method, steps = key
    row = {
        "method": method,
        "steps": steps,
        "label": method_label(method, steps),
        "n_images": len(records),
        "complete": len(records) == n_total,
    }
    for metric in ("psnr", "psnr_y", "ssim", "lpips", "consistency", "sample_std", "std_error_correlation"):
        row[metric] = _mean(records, metric)
    row["lpips_note"] = None if row["lpips"] is not None or not records else _lpips_note(records)
    row["seconds_per_image"] = _mean(records, "seconds")
    fid = kid = None
    if not records:
        note = "n/a (no records yet)"
    elif len(records) < n_total:
        note = f"n/a ({len(records)} of {n_total} images done)"
    else:
        restored, clean = feats.of(records), feats.clean()
        if restored is None or clean is None:
            note = f"n/a ({reason})"
        else:
            fid, kid, note = feats.fid_kid(key, restored, clean)
    row.update(fid=fid, kid=kid, fid_note=note)
    t = throughput.get(key)
    row.update(
        throughput_samples_per_s=t["samples_per_s"] if t else None,
        throughput_batch_size=t["batch_size"] if t else None,
        throughput_device=t["device"] if t else None,
        throughput_dtype=t["dtype"] if t else None,
    )
    return row


def _skipped(run: Path) -> list[dict]:
    """The images ``evaluate --skip-bad`` left out (skipped.json), if any."""
    path = run / "skipped.json"
    try:
        items = json.loads(path.read_text()) if path.exists() else []
    except ValueError:
        raise EvalError(f"{path} is not readable JSON") from None
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def compute_results(run: str | Path) -> dict:
    """Every number of the report, as one JSON-able dict."""
    run = Path(run)
    if not run.is_dir():
        raise EvalError(f"{run}: no such run folder")
    config = read_config(run)
    if config is None:
        raise EvalError(f"{run} is not an evaluation run (no config.json)")
    settings, grid = config["settings"], config["grid"]
    files = (run / "files.txt").read_text().splitlines()
    n_total = len(files)
    by_cell: dict[tuple, list[dict]] = {}
    for r in read_records(run, warn=True):
        by_cell.setdefault((r["task"], r["method"], int(r["steps"])), []).append(r)
    throughput = {(t["task"], t["method"], int(t["steps"])): t for t in read_jsonl(run / "throughput.jsonl") if "samples_per_s" in t}
    feats, reason = _Features(run, n_total), _features_reason(run)
    rows: dict[tuple, dict] = {}

    def row(key):
        if key not in rows:
            rows[key] = _row(key, by_cell.get(key, []), n_total, feats, reason, throughput)
        return rows[key]

    tables = {task: [row(key) for key in table_cells(grid) if key[0] == task] for task in grid["tasks"]}
    ft = grid["figure_task"]
    fig7_keys = list(dict.fromkeys(sorted(sweep_cells(grid) + [(ft, m, grid["steps"][m]) for m in grid["methods"]], key=lambda k: (k[1], k[2]))))
    points = [dict(row(k), task=ft) for k in fig7_keys]
    use_fid = bool(points) and all(p["fid"] is not None for p in points)
    feats.save_cache()
    return {
        "format": 1,
        "settings": settings,
        "grid": grid,
        "n_images": n_total,
        "records": sum(len(v) for v in by_cell.values()),
        **({"skipped": skipped} if (skipped := _skipped(run)) else {}),
        "tables": tables,
        "fig7": {"task": ft, "y": "fid" if use_fid else "psnr", "points": points},
    }


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def figure4(results: dict, run: Path, path: Path) -> None:
    grid, n = results["grid"], results["n_images"]
    methods = [(m, grid["steps"][m]) for m in grid["methods"]]
    rows = [(t, i) for t in grid["tasks"] for i in range(min(FIGURE_IMAGES, n))]
    options = grid.get("options", {})  # the run's non-default method options belong under the picture too
    cols = ["original", "degraded"] + [
        ", ".join([method_label(m, s), *(f"{k}={v}" for k, v in options.get(m, {}).items())]) for m, s in methods
    ]
    cells = []
    for task, i in rows:
        name = image_name(i, n)
        imgs = [run / "images" / "clean" / f"{name}.png", run / "images" / task / "degraded" / f"{name}.png"]
        imgs += [run / "images" / cell_dir(task, m, s) / f"{name}.png" for m, s in methods]
        cells.append([read_png(p) for p in imgs])
    draw_image_grid(
        path,
        cells,
        col_titles=[textwrap.fill(c, 18) for c in cols],
        row_labels=[f"{task}\nimage {i}" for task, i in rows],
        title="Figure 4: restorations (rows: task / image; columns: original, degraded, methods)",
        cell_px=150,
        label_px=80,
    )


def _display(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """(C, H, W) array -> displayable (H, W[, 3]) in [0, 1]; second value: min-max normalised."""
    a = np.asarray(a, dtype=np.float32)
    a = a[:3] if a.shape[0] >= 3 else a[:1]
    stretched = not (a.min() >= -1.05 and a.max() <= 1.05)
    if stretched:
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo if hi > lo else 1.0)
    else:
        a = (a + 1) / 2
    a = np.clip(a, 0, 1).transpose(1, 2, 0)
    return (a[..., 0] if a.shape[-1] == 1 else a), stretched


def figure6(results: dict, run: Path, path: Path) -> None:
    from matplotlib.figure import Figure

    grid = results["grid"]
    task = grid["figure_task"]
    found = []
    for m in grid["methods"]:
        p = run / "intermediates" / f"{cell_dir(task, m, grid['steps'][m])}.npz"
        if p.exists():
            with np.load(p) as z:
                found.append((m, grid["steps"][m], {k: z[k] for k in z.files}))
    ncols = max([len(d["step"]) for _, _, d in found] or [1])
    nrows = max(1, 2 * len(found))
    fig = Figure(figsize=(1.5 * ncols + 0.6, 1.6 * nrows), dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    if not found:
        axes[0][0].text(0.5, 0.5, "no intermediates stored", ha="center", va="center", transform=axes[0][0].transAxes)
    for k, (m, s, d) in enumerate(found):
        for j in range(len(d["step"])):
            for r, (key, what) in enumerate((("x_t", "x_t"), ("x0", "x0 pred."))):
                img, stretched = _display(d[key][j])
                ax = axes[2 * k + r][j]
                ax.set_axis_on()
                show_image(ax, img, f"step {int(d['step'][j])} (t={int(d['t'][j])})" if r == 0 else None)
                if j == 0:
                    ax.set_ylabel(f"{m.upper()}\n{what}" + ("\n(normalised)" if stretched else ""), fontsize=8)
    fig.suptitle(f"Figure 6: intermediate states, {task}, image 0 (table steps)", fontsize=9)
    fig.subplots_adjust(left=0.1, right=0.99, bottom=0.01, top=1 - 0.75 / fig.get_figheight(), wspace=0.05, hspace=0.25)
    save_figure(fig, path)


def figure7(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    f7 = results["fig7"]
    use_fid = f7["y"] == "fid"
    fig = Figure(figsize=(6.4, 4.6), dpi=100)
    ax = fig.subplots()
    plotted = False
    for m in dict.fromkeys(p["method"] for p in f7["points"]):
        pts = [p for p in f7["points"] if p["method"] == m and p["throughput_samples_per_s"] and p["fid" if use_fid else "psnr"] is not None]
        if not pts:
            continue
        xs = [p["throughput_samples_per_s"] for p in pts]
        ys = [p["fid" if use_fid else "psnr"] for p in pts]
        ax.plot(xs, ys, marker="o", label=m.upper())
        for p, x, y in zip(pts, xs, ys):
            ax.annotate(str(p["steps"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        plotted = True
    ax.set_xscale("log")
    ax.set_xlabel("Throughput (samples/s, log scale)")
    bottom = 0.12
    if use_fid:
        ax.set_ylabel("FID (lower is better)")
    else:
        ax.set_ylabel("PSNR (dB, higher is better; FID unavailable)")
        note = next((p["fid_note"] for p in f7["points"] if p["fid_note"]), "n/a")
        lines = textwrap.wrap(f"FID unavailable, PSNR shown instead: {note}", 100)
        fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, va="bottom")
        bottom += 0.03 * len(lines)
    if plotted:
        ax.legend(title="method (labels: steps)", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no throughput measured yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"Figure 7: {'FID' if use_fid else 'PSNR'} vs throughput across step counts ({f7['task']})", fontsize=9)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=bottom, top=0.92)
    save_figure(fig, path)


# --------------------------------------------------------------------------------------------


def write_report(run: str | Path) -> dict:
    """Write results.json, tables.md/.csv, the figures and fig7.csv into RUN; returns the results."""
    run = Path(run)
    results = compute_results(run)
    rows = [dict(r, task=t) for t, rs in results["tables"].items() for r in rs]
    image_io.atomic_write_json(run / "results.json", results)
    image_io.atomic_write_text(run / "tables.md", tables_markdown(results))
    image_io.atomic_write_text(run / "tables.csv", to_csv(rows))
    image_io.atomic_write_text(run / "fig7.csv", to_csv(results["fig7"]["points"]))
    figure4(results, run, run / "fig4_grid.png")
    figure6(results, run, run / "fig6_intermediates.png")
    figure7(results, run / "fig7_fid_throughput.png")
    return results
