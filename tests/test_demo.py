"""`diffrestore demo` end to end through ``cli.main``, with random-weight tiny priors (golden weights) at 64x64.

Checked against independent references: PSNR/SSIM recomputed from the saved PNGs (numpy, and
scikit-image's SSIM), the grid's cells compared pixel for pixel with the saved PNGs, the measurement
redrawn with the evaluation's seeding.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffrestore import cli, demo
from diffrestore.figures import GridGeometry
from diffrestore.methods import method_options

TASKS = ["sr4", "deblur", "denoise", "noisy-sr4"]
METHODS = ["ddrm", "diffpir", "ddrm-ldm", "srldm"]  # the default: the methods a user should pick
SEED = 5


@pytest.fixture(scope="module")
def priors(shared) -> dict[str, str]:
    return {
        "pixel": str(shared / "golden" / "ddrm" / "unet_state_dict.pt"),
        "latent": str(shared / "golden" / "ldm" / "ldm_sr_tiny.ckpt"),
    }


@pytest.fixture(scope="module")
def run(priors, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    argv = ["demo", "--out", str(out), "--images", "1", "--size", "64", "--steps", "2,ddrm-ldm:3", "--seed", str(SEED),
            "--pixel-prior", priors["pixel"], "--latent-prior", priors["latent"], "--device", "cpu", "--no-progress"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        import io
        import sys

        stdout, stderr = io.StringIO(), io.StringIO()
        mp.setattr(sys, "stdout", stdout)
        mp.setattr(sys, "stderr", stderr)
        rc = cli.main(argv)
    assert rc == 0, stderr.getvalue()
    return out, stdout.getvalue()


def _u8(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode in ("RGB", "RGBA"), im.mode  # matplotlib writes the grid as RGBA (opaque)
        if im.mode == "RGBA":
            assert np.asarray(im)[..., 3].min() == 255
        return np.asarray(im.convert("RGB"))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2)
    return float(10 * np.log10(1 / mse))


def test_writes_every_output_and_reports_where(run):
    out, stdout = run
    names = {"astronaut_clean.png"}
    for t in TASKS:
        names |= {f"astronaut_{t}_{m}.png" for m in ["degraded", "baseline", *METHODS]}
    assert {p.name for p in (out / "images").iterdir()} == names
    for f in ("demo_grid.png", "metrics.md", "metrics.csv", "summary.json"):
        assert (out / f).stat().st_size > 0
    assert not list(out.rglob(".*.tmp"))
    with Image.open(out / "images" / "astronaut_sr4_ddrm.png") as im:
        assert im.mode == "RGB"
    assert _u8(out / "images" / "astronaut_sr4_degraded.png").shape == (16, 16, 3)
    assert _u8(out / "images" / "astronaut_sr4_ddrm.png").shape == (64, 64, 3)
    s = json.loads((out / "summary.json").read_text())
    assert s["settings"]["steps"] == {"ddrm": 2, "diffpir": 2, "ddrm-ldm": 3, "srldm": 2}
    assert s["settings"]["photos"] == ["astronaut"] and s["settings"]["size"] == 64
    from diffrestore.methods import method_options

    assert s["settings"]["options"] == {m: method_options(m) for m in METHODS}
    assert s["settings"]["options"]["ddrm"]["consistency"] is True  # the recommended default, not the paper's
    assert s["restorations"] == len(TASKS) * len(METHODS) and s["skipped"] == []
    assert s["wall_seconds"] > 0 and s["peak_rss_mib"] > 50
    assert sorted(s["files"]["images"]) == sorted(f"images/{n}" for n in names)
    # printed: the table, where the results are, wall time and peak memory
    assert "| Task | Method | Steps | Options | PSNR (dB) | SSIM | Time per image (s) |" in stdout
    assert str(out / "demo_grid.png") in stdout and str(out / "metrics.csv") in stdout
    assert "wall time" in stdout and "peak memory" in stdout


def test_metrics_table_has_a_row_per_task_and_method_baseline_first(run):
    out, _ = run
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == demo.DEMO_CSV_FIELDS
    assert [(r["task"], r["method"]) for r in rows] == [(t, m) for t in TASKS for m in ["baseline", *METHODS]]
    assert all(r["n_images"] == "1" and float(r["seconds_per_image"]) >= 0 for r in rows)
    baselines = {"sr4": "bicubic upscaling", "noisy-sr4": "bicubic upscaling", "deblur": "the input as is", "denoise": "the input as is"}
    labels = {"ddrm": "DDRM", "diffpir": "DiffPIR", "ddrm-ldm": "DDRM-LDM", "srldm": "SRLDM"}  # none expected to fail
    assert [r["label"] for r in rows] == [lab for t in TASKS for lab in [f"baseline: {baselines[t]}", *labels.values()]]
    assert {r["options"] for r in rows if r["method"] == "srldm"} == {"consistency=true"}
    text = (out / "metrics.md").read_text()
    assert "- baseline (no model): sr4, noisy-sr4: bicubic upscaling; deblur, denoise: the input as is\n" in text
    assert "fail" not in text
    md = [ln for ln in text.splitlines() if ln.startswith("| ") and "Task" not in ln]
    assert len(md) == len(rows)
    for line, r in zip(md, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:2] == [r["task"], r["label"]]
        assert cells[2] == ("—" if r["method"] == "baseline" else r["steps"])
        assert cells[4:6] == [f"{float(r['psnr']):.2f}", f"{float(r['ssim']):.4f}"]


def test_metrics_equal_a_recomputation_from_the_saved_pngs(run):
    """Convention: PSNR/SSIM are computed on the saved 8-bit images, so the files reproduce them."""
    from skimage.metrics import structural_similarity

    out, _ = run
    clean = _u8(out / "images" / "astronaut_clean.png")
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        img = _u8(out / "images" / f"astronaut_{r['task']}_{r['method']}.png")
        assert float(r["psnr"]) == pytest.approx(_psnr(img, clean), abs=1e-9), (r["task"], r["method"])
        ref_ssim = structural_similarity(
            img / 255.0, clean / 255.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=1.0, channel_axis=-1,
        )  # fmt: skip
        assert float(r["ssim"]) == pytest.approx(ref_ssim, abs=1e-9), (r["task"], r["method"])
    # the baseline of the same-size tasks is the degraded image itself
    deg = _u8(out / "images" / "astronaut_denoise_degraded.png")
    assert np.array_equal(deg, _u8(out / "images" / "astronaut_denoise_baseline.png"))


def test_grid_has_one_cell_per_row_and_column_showing_the_saved_pngs(run):
    out, _ = run
    s = json.loads((out / "summary.json").read_text())["grid"]
    assert s["rows"] == [["astronaut", t] for t in TASKS]
    assert s["columns"] == ["clean", "degraded", "baseline", *METHODS]
    # titles: what the baseline is; each method with its steps and key options (the registry's defaults but srldm's)
    defaults = {m: method_options(m) for m in ("ddrm", "ddrm-ldm")}
    assert [t.replace("\n", " ") for t in s["titles"]] == [
        "clean", "degraded", "baseline (no model): named under each image", f"DDRM 2 steps, eta={defaults['ddrm']['eta']}",
        "DiffPIR 2 steps", f"DDRM-LDM 3 steps, start={defaults['ddrm-ldm']['start']}, stop={defaults['ddrm-ldm']['stop']}",
        "SRLDM 2 steps, consistency=true",
    ]  # fmt: skip
    # the baseline's caption names it per task; the methods' captions are their PSNR
    for caps, task in zip(s["captions"], TASKS):
        assert caps[2].startswith({"sr4": "bicubic upscaling: ", "noisy-sr4": "bicubic upscaling: "}.get(task, "the input as is: "))
        assert all(c.endswith(" dB") and c[0].isdigit() for c in caps[3:])
    nrows, ncols = len(TASKS), 3 + len(METHODS)
    cell, gap = demo.GRID_CELL_PX, GridGeometry.GAP_PX
    width = demo.GRID_LABEL_PX + ncols * cell + (ncols - 1) * gap + GridGeometry.MARGIN_PX
    height = (GridGeometry.TITLE_PX + demo.GRID_COL_TITLE_PX + nrows * (cell + GridGeometry.CAPTION_PX)
              + (nrows - 1) * gap + GridGeometry.MARGIN_PX)  # fmt: skip
    grid = _u8(out / "demo_grid.png")
    assert grid.shape == (height, width, 3) and s["size_px"] == [width, height]
    geo = GridGeometry(nrows, ncols, cell_px=cell, label_px=demo.GRID_LABEL_PX, captions=True, title=True,
                       col_title_px=demo.GRID_COL_TITLE_PX)  # fmt: skip
    for r, (_, task) in enumerate(s["rows"]):
        for c, col in enumerate(s["columns"]):
            name = "astronaut_clean.png" if col == "clean" else f"astronaut_{task}_{col}.png"
            with Image.open(out / "images" / name) as im:
                want = np.asarray(im.convert("RGB").resize((cell, cell), Image.NEAREST))
            x0, y0, x1, y1 = geo.box(r, c)
            got = grid[y0:y1, x0:x1]
            # the interior (inside the cell frame) is the PNG, nearest-neighbour upscaled
            assert np.abs(got[2:-2, 2:-2].astype(int) - want[2:-2, 2:-2]).mean() < 1.0, (task, col)
    # the caption strips hold text (PSNR) and are not a copy of the image
    x0, y0, x1, y1 = geo.box(0, 3)
    strip = grid[y1 + 2 : y1 + GridGeometry.CAPTION_PX, x0:x1]
    assert strip.min() < 128 and strip.mean() > 200


def test_measurement_uses_the_evaluation_seeding(run):
    from diffrestore.evaluation.data import center_crop_resize
    from diffrestore.image_io import pil_to_rgb, uint8_to_tensor
    from diffrestore.operators.tasks import make_task
    from diffrestore.restoration import image_seed, make_generator
    import skimage.data

    out, _ = run
    clean = center_crop_resize(pil_to_rgb(Image.fromarray(skimage.data.astronaut())), 64)
    assert np.array_equal(np.asarray(clean), _u8(out / "images" / "astronaut_clean.png"))
    x = uint8_to_tensor(np.asarray(clean)).unsqueeze(0)
    for t in ("denoise", "noisy-sr4"):
        task = make_task(t, (3, 64, 64))
        y = task.operator.measure(x, task.sigma_y, generator=make_generator(image_seed(SEED, "astronaut#measurement")))
        want = ((task.operator.to_image(y)[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(want, _u8(out / "images" / f"astronaut_{t}_degraded.png")), t


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "ddrm,nope"], "unknown method 'nope'"),
        (["--tasks", "sr4,blurry"], "unknown task 'blurry'"),
        (["--steps", "nope:3"], "unknown method 'nope'"),
        (["--images", "5"], "--images must be between 1 and 4"),
        (["--size", "66"], "cannot be downsampled by 4"),
        (["--pixel-prior", "/no/such/prior.pt", "--methods", "ddrm"], "no such file"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--methods", ""], "--methods is empty"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    rc = cli.main(["demo", "--out", str(out), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("diffrestore: error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


@pytest.fixture
def builtins(tmp_path, priors, monkeypatch):
    """A builtin folder with a complete pixel prior and a latent prior still in training (no unet/ yet)."""
    from diffrestore.priors import catalog

    root = tmp_path / "builtin"
    (root / "pix").mkdir(parents=True)
    shutil.copy(priors["pixel"], root / "pix" / "unet_state_dict.pt")
    lat = root / "lat"
    (lat / "vae").mkdir(parents=True)
    (lat / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    (lat / "vae" / "config.json").write_text("{}")
    (lat / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    monkeypatch.setattr(catalog, "builtin_dir", lambda: root)
    return ["--pixel-prior", "builtin:pix", "--latent-prior", "builtin:lat"]


def test_methods_of_an_untrained_builtin_prior_are_skipped_with_a_warning(tmp_path, capsys, builtins):
    out = tmp_path / "out"
    rc = cli.main(["demo", "--out", str(out), "--images", "1", "--size", "32", "--tasks", "denoise", "--steps", "2", "--no-progress", *builtins])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    warnings = [ln for ln in captured.err.splitlines() if "warning" in ln]
    assert warnings == [
        "diffrestore: warning: skipping ddrm-ldm, srldm: builtin prior 'lat' skipped: no weights yet in unet/ "
        "(builtin:lat; pass --latent-prior SPEC to use another)"
    ]
    with open(out / "metrics.csv", newline="") as f:
        rows = [(r["task"], r["method"]) for r in csv.DictReader(f)]
    assert rows == [("denoise", "baseline"), ("denoise", "ddrm"), ("denoise", "diffpir")]
    s = json.loads((out / "summary.json").read_text())
    assert [x["method"] for x in s["skipped"]] == ["ddrm-ldm", "srldm"]
    assert s["grid"]["columns"] == ["clean", "degraded", "baseline", "ddrm", "diffpir"]
    assert "skipped: ddrm-ldm" in (out / "metrics.md").read_text()
    assert "skipped srldm: builtin prior 'lat' skipped: no weights yet in unet/" in captured.out


def test_a_named_method_whose_builtin_prior_is_untrained_is_an_error(tmp_path, capsys, builtins):
    out = tmp_path / "out"
    rc = cli.main(["demo", "--out", str(out), "--methods", "ddrm,srldm", "--size", "32", "--no-progress", *builtins])
    err = capsys.readouterr().err
    assert rc == 2 and err == (
        "diffrestore: error: srldm needs the latent prior builtin:lat, which is not usable: "
        "builtin prior 'lat' skipped: no weights yet in unet/\n"
    )
    assert not out.exists()


def test_a_failed_run_leaves_no_partial_output(tmp_path, capsys, builtins, monkeypatch):
    from diffrestore import restoration

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise FloatingPointError("ddrm produced non-finite values")

    monkeypatch.setattr(restoration, "run_method", failing)
    out = tmp_path / "out"
    rc = cli.main(["demo", "--out", str(out), "--size", "32", "--tasks", "sr4", "--no-progress", *builtins])
    assert rc == 2 and calls == [1]
    assert capsys.readouterr().err.endswith("diffrestore: error: ddrm produced non-finite values\n")
    assert not out.exists()


def test_frozen_graphs_give_the_same_metrics_and_are_recorded(tmp_path, priors, capsys, frozen_traces):
    """``--frozen-graphs`` changes the speed only: same PSNR/SSIM to float rounding; the summary says it was on,
    and both priors' UNets ran as graphs (traced only with the flag)."""
    summaries, traced = [], []
    for flag in ([], ["--frozen-graphs"]):
        out = tmp_path / f"out{len(flag)}"
        rc = cli.main(["demo", "--out", str(out), "--images", "1", "--size", "64", "--tasks", "noisy-sr4", "--methods",
                       "ddrm,srldm", "--steps", "2", "--pixel-prior", priors["pixel"], "--latent-prior", priors["latent"],
                       "--device", "cpu", "--no-progress", *flag])  # fmt: skip
        assert rc == 0, capsys.readouterr().err
        summaries.append(json.loads((out / "summary.json").read_text()))
        traced.append(len(frozen_traces))
    assert traced[0] == 0 and traced[1] >= 2  # pixel and latent UNet (more for a second batch size)
    assert [s["settings"]["frozen_graphs"] for s in summaries] == [False, True]
    plain, frozen = ({(r["method"], r["task"]): r for r in s["table"]} for s in summaries)
    assert plain.keys() == frozen.keys() and len(plain) == 3  # baseline, ddrm, srldm
    for key, row in plain.items():
        assert frozen[key]["psnr"] == pytest.approx(row["psnr"], abs=0.02), key
        assert frozen[key]["ssim"] == pytest.approx(row["ssim"], abs=1e-3), key


def _block_mean(img: np.ndarray, f: int = 4) -> np.ndarray:
    h, w, c = img.shape
    return img.astype(np.float64).reshape(h // f, f, w // f, f, c).mean(axis=(1, 3))


def test_default_srldm_runs_with_its_consistency_step(run):
    """The default demo's SRLDM has consistency=true: on noiseless sr4 its output averages back to the
    measurement (the projection onto {Hx = y}), up to the 8-bit rounding and clamping of the saved PNGs."""
    out, _ = run
    s = json.loads((out / "summary.json").read_text())["settings"]
    assert s["report"] is False and s["options"]["srldm"]["consistency"] is True
    y = _u8(out / "images" / "astronaut_sr4_degraded.png").astype(np.float64)
    err = np.abs(_block_mean(_u8(out / "images" / "astronaut_sr4_srldm.png")) - y).mean()
    assert err < 3.0, err  # in 8-bit levels; without the step the tiny random model is tens of levels off


@pytest.fixture(scope="module")
def report_run(priors, tmp_path_factory):
    """``demo --report`` on sr4 only, recording what each method was called with."""
    from diffrestore import restoration

    out = tmp_path_factory.mktemp("demo_report") / "out"
    calls: dict[str, dict] = {}
    real = restoration.run_method

    def spy(method, *args, **kwargs):
        calls[method] = kwargs
        return real(method, *args, **kwargs)

    argv = ["demo", "--report", "--out", str(out), "--images", "1", "--size", "64", "--tasks", "sr4", "--steps", "2",
            "--seed", str(SEED), "--pixel-prior", priors["pixel"], "--latent-prior", priors["latent"], "--no-progress"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(restoration, "run_method", spy)
        assert cli.main(argv) == 0
    return out, calls


def test_report_variant_runs_the_reports_setups_with_their_options(report_run):
    out, calls = report_run
    assert list(calls) == ["srldm", "ddrm", "ddrm-srldm", "ddrm-ldm"]
    # the report's options are passed explicitly, whatever the registry's defaults become
    assert {k: calls["srldm"][k] for k in ("eta", "start", "consistency")} == {"eta": 1.0, "start": 1.0, "consistency": False}
    assert calls["ddrm"]["eta"] == 0.85 and calls["ddrm"]["eta_b"] == 1.0
    assert calls["ddrm-srldm"]["strategy"] == "a" and calls["ddrm-srldm"]["eta"] == 0.85
    assert not ({"eta", "start", "stop", "consistency"} & set(calls["ddrm-ldm"]))  # this project's method: its defaults
    # SRLDM without the consistency step is not tied to the measurement (compare the default demo's test)
    y = _u8(out / "images" / "astronaut_sr4_degraded.png").astype(np.float64)
    assert np.abs(_block_mean(_u8(out / "images" / "astronaut_sr4_srldm.png")) - y).mean() > 10.0


def test_report_variant_labels_the_failing_setups(report_run):
    out, _ = report_run
    s = json.loads((out / "summary.json").read_text())
    labels = {"srldm": "SRLDM (report; fails: colour drift)", "ddrm": "DDRM (report)",
              "ddrm-srldm": "DDRM-SRLDM (report; fails: checkerboard)", "ddrm-ldm": "DDRM-LDM"}  # fmt: skip
    assert s["settings"]["report"] is True and s["settings"]["labels"] == labels
    titles = [t.replace("\n", " ") for t in s["grid"]["titles"]]
    assert titles[2] == "baseline (no model): bicubic upscaling"
    assert titles[3] == "SRLDM (report; fails: colour drift) 2 steps, consistency=false"
    assert titles[4] == "DDRM (report) 2 steps, eta=0.85"
    assert titles[5] == "DDRM-SRLDM (report; fails: checkerboard) 2 steps, strategy=a"
    assert titles[6].startswith("DDRM-LDM 2 steps")
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["baseline: bicubic upscaling", *labels.values()]
    text = (out / "metrics.md").read_text()
    assert "- baseline (no model): sr4: bicubic upscaling\n" in text
    fails = [ln for ln in text.splitlines() if "expected to fail" in ln]
    assert [ln.split(":")[0] for ln in fails] == ["- SRLDM (report; fails", "- DDRM-SRLDM (report; fails"]
    assert "colours to the measurement" in fails[0] and "checkerboard" in fails[1]
    assert "| sr4 | SRLDM (report; fails: colour drift) | 2 | consistency=false |" in text


def test_column_labels_follow_the_options_used():
    from diffrestore import demo_columns as dc

    Column = dc.Column
    assert dc.failure(Column("srldm", 5, {"consistency": True})) is None
    assert dc.label(Column("srldm", 5, {"consistency": False})) == "SRLDM (fails: colour drift)"
    assert dc.label(Column("ddrm-srldm", 5)) == "DDRM-SRLDM (fails: checkerboard)"  # whatever its options
    assert dc.label(Column("ddrm", 5, report=True)) == "DDRM (report)"
    # key options always, others only when set away from the registry's default
    eta = method_options("ddrm")["eta"]
    assert dc.settings(Column("ddrm", 7)) == f"7 steps, eta={eta}"
    assert dc.settings(Column("ddrm", 7, {"eta_b": 0.5})) == f"7 steps, eta={eta}, eta_b=0.5"
    assert dc.settings(Column("ddrm", 7, {"eta_b": method_options("ddrm")["eta_b"]})) == f"7 steps, eta={eta}"
    assert dc.settings(Column("ddnm", 3)) == "3 steps"


def test_columns_of_named_methods_and_step_overrides():
    from diffrestore import demo_columns as dc
    from diffrestore.methods import get_method

    cols = dc.columns(["ddrm", "ddnm"], True, {"ddnm": 4})
    assert [(c.method, c.steps, dict(c.options), c.report) for c in cols] == [
        ("ddrm", 20, {"eta": 0.85, "eta_b": 1.0}, True), ("ddnm", 4, {}, False)
    ]  # fmt: skip
    cols = dc.columns(None, False, {"*": 3})
    assert [(c.method, c.steps) for c in cols] == [("ddrm", 3), ("diffpir", 3), ("ddrm-ldm", 3), ("srldm", 3)]
    assert dc.columns(["pigdm"], False, {})[0].steps == get_method("pigdm").default_steps


@pytest.mark.parametrize(
    "tasks, title",
    [
        (["sr4"], "baseline (no model):\nbicubic upscaling"),
        (["sr4", "noisy-sr4", "sr4-bicubic"], "baseline (no model):\nbicubic upscaling"),
        (["deblur"], "baseline (no model):\nthe input as is"),
        (["colorize"], "baseline (no model):\ngrey input in RGB"),
        (["sr4", "deblur"], "baseline (no model):\nnamed under each image"),
    ],
)
def test_baseline_title_per_task(tasks, title):
    from diffrestore import demo_columns as dc

    assert dc.baseline_title(tasks) == title


def test_baseline_descriptions_say_what_the_baseline_computes():
    """The words match what ``Task.baseline`` does: bicubic interpolation of y, y itself, y in every channel."""
    import torch.nn.functional as F

    from diffrestore import demo_columns as dc
    from diffrestore.operators.tasks import make_task

    x = torch.rand(1, 3, 16, 16) * 2 - 1
    sr4, denoise, colorize = (make_task(t, (3, 16, 16)) for t in ("sr4", "denoise", "colorize"))
    y = sr4.measure(x)
    assert torch.allclose(sr4.baseline(y), F.interpolate(y, size=(16, 16), mode="bicubic", align_corners=False).clamp(-1, 1))
    y = denoise.measure(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(denoise.baseline(y), y.reshape(x.shape).clamp(-1, 1))  # the noisy input as is
    grey = x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    assert torch.allclose(colorize.baseline(colorize.measure(x)), grey, atol=1e-6)
    assert dc.baseline_note(["sr4", "deblur", "noisy-sr4", "colorize"]) == (
        "baseline (no model): sr4, noisy-sr4: bicubic upscaling; deblur: the input as is; colorize: grey input in RGB"
    )


def test_help_names_the_sets_and_steps_the_demo_runs():
    """``demo --help`` is written without importing the demo (no torch): check its lists against the sets."""
    from diffrestore import demo_columns as dc

    sub = next(a for a in cli.build_parser()._actions if getattr(a, "choices", None) and "demo" in a.choices)
    helps = {a.dest: a.help for a in sub.choices["demo"]._actions}
    user, report = (",".join(c.method for c in s) for s in (dc.USER_COLUMNS, dc.REPORT_COLUMNS))
    assert f"(default: {user}; with --report: {report})" in helps["methods"]
    by_steps: dict[int, list[str]] = {}
    for c in dict((c.method, c) for c in (*dc.USER_COLUMNS, *dc.REPORT_COLUMNS)).values():
        by_steps.setdefault(c.steps, []).append(c.method)
    for steps, methods in by_steps.items():
        assert f"{', '.join(methods)} {steps}" in helps["steps"], (steps, methods)
