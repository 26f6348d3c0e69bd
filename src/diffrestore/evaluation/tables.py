"""Tables 1-4 of an evaluation run as Markdown and CSV, from the rows :mod:`report` computes.

One table per task, baseline first: Method | PSNR | PSNR-Y | SSIM | LPIPS | FID | KID | s/image |
Throughput. A metric that cannot be computed shows why (``n/a (...)``: the FID without Inception
weights, the LPIPS without its weights and how to install them); no number is made up.
"""

from __future__ import annotations

import csv
import io as _io

from diffrestore.operators.tasks import BASELINE

#: row fields that are measurements of time (they differ between runs of the same grid)
TIMING_FIELDS = ("seconds_per_image", "throughput_samples_per_s", "throughput_batch_size", "throughput_device", "throughput_dtype")
CSV_FIELDS = (
    "task", "method", "steps", "n_images", "psnr", "psnr_y", "ssim", "fid", "kid", "lpips", "consistency",
    "sample_std", "std_error_correlation", "throughput_samples_per_s", "throughput_batch_size", "throughput_device", "throughput_dtype",
    "seconds_per_image", "fid_note", "lpips_note",
)  # fmt: skip
HEADER = ["Method", "PSNR (dB)", "PSNR-Y (dB)", "SSIM", "LPIPS", "FID", "KID", "Time (s/image)", "Throughput (samples/s)"]


def method_label(method: str, steps: int) -> str:
    return "Baseline" if method == BASELINE else f"{method.upper()} ({steps} steps)"


def _num(v, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _rate(v) -> str:
    """Throughput or seconds with about three significant digits."""
    if v is None:
        return "—"
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3g}"


def row_cells(r: dict, n_images: int) -> list[str]:
    """The Markdown cells of one table row (see :data:`HEADER`)."""
    label = r["label"] + ("" if r["complete"] else f" [{r['n_images']}/{n_images} images]")
    fid = _num(r["fid"], 2) if r["fid"] is not None else r["fid_note"]
    kid = _num(r.get("kid"), 4) if r.get("kid") is not None else "—"
    lpips = _num(r["lpips"], 4) if r.get("lpips") is not None else r.get("lpips_note") or "—"
    throughput = "—" if r["method"] == BASELINE else _rate(r["throughput_samples_per_s"])
    return [label, _num(r["psnr"], 2), _num(r.get("psnr_y"), 2), _num(r["ssim"], 4), lpips, fid, kid,
            _rate(r["seconds_per_image"]), throughput]  # fmt: skip


def tables_markdown(results: dict) -> str:
    s, grid = results["settings"], results["grid"]
    lines = [
        "# Evaluation results",
        "",
        f"- data: `{s['data']}`, {results['n_images']} images (seed {s['seed']}), {s['size']}x{s['size']}",
        f"- priors: pixel `{s.get('pixel_prior')}`, latent `{s.get('latent_prior')}`; dtype {s['dtype']}",
        "- PSNR / SSIM: mean over images, on [0, 1] float RGB; PSNR-Y: on the ITU-R BT.601 luma "
        "(Y = 16 + 65.481 R + 128.553 G + 24.966 B, [0, 255] units), no border crop",
        "- LPIPS: AlexNet v0.1, on the 8-bit images (as saved), mean over images; "
        "FID / KID: restored set vs the clean set (Inception pool features; KID is the unbiased "
        "polynomial-kernel MMD estimate, so it can be slightly negative for sets closer than sampling noise)",
    ]
    if results.get("skipped"):
        first = results["skipped"][0]
        lines.append(f"- left out {len(results['skipped'])} unusable image(s) (--skip-bad; skipped.json), e.g. "
                     f"`{first.get('file')}`: {first.get('reason')}")
    for method, options in grid.get("options", {}).items():
        lines.append(f"- options of {method}: " + ", ".join(f"{k}={v}" for k, v in options.items()))
    lines += [
        "- Time: seconds per image of the method alone, one image per call, mean over images; "
        "Throughput: the method alone on one batch after a warm-up call (no data loading, no metrics)",
    ]
    for k, task in enumerate(grid["tasks"], 1):
        rows = results["tables"][task]
        tp = next((r for r in rows if r["throughput_device"]), None)
        lines += ["", f"## Table {k}: {task}", ""]
        if tp:
            lines += [f"Throughput measured with batch size {tp['throughput_batch_size']} on {tp['throughput_device']} ({tp['throughput_dtype']}).", ""]
        lines += ["| " + " | ".join(HEADER) + " |", "|" + "|".join([":--"] + ["--:"] * (len(HEADER) - 1)) + "|"]
        lines += ["| " + " | ".join(row_cells(r, results["n_images"])) + " |" for r in rows]
        spread = [r for r in rows if r["sample_std"] is not None]
        if spread:
            lines += ["", "Spread of the samples each restoration averages (per-pixel std in [-1, 1] units, mean over "
                      "images; its correlation with the absolute error, mean over images): " + "; ".join(
                          f"{r['label']} {r['sample_std']:.4f}, {r['std_error_correlation']:.2f}" for r in spread) + "."]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict], fields=CSV_FIELDS) -> str:
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return buf.getvalue()
