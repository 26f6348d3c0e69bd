"""The evaluation runner: records against an independent recomputation, resume after kill -9,
sharding (--nproc 2, torchrun) against one process, grid extension, refusals and bad input.

The heavy parts (diffusion methods, priors, Inception) are the fakes of ``test_runner_fakes``;
tasks and metrics are the real ones.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import test_runner_fakes as fx
from diffrestore.evaluation import store
from diffrestore.metrics import quality as metrics
from diffrestore.evaluation.data import load_eval_image
from diffrestore.operators.tasks import make_task
from diffrestore.restoration import image_seed, make_generator


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return fx.make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """One uninterrupted single-process run, in this process."""
    run = tmp_path_factory.mktemp("ref") / "run"
    with pytest.MonkeyPatch.context() as mp:
        rc, out, err = fx.run_cli(mp, fx.evaluate_argv(data, run))
    assert rc == 0, err
    assert "## Table 1: sr4" in out
    return run


def _subprocess(args, preexec_fn=None, **env):
    return subprocess.Popen(
        [sys.executable, "-m", "diffrestore", *args],
        cwd=fx.ROOT,
        env=fx.subprocess_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )


def _kill_after_records(proc, records: Path, n: int, timeout: float) -> None:
    """SIGKILL ``proc`` (no clean-up of any kind) once ``records`` has ``n`` lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and records.read_bytes().count(b"\n") >= n:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.kill()
    proc.wait()


# --------------------------------------------------------------------------------------------
# units
# --------------------------------------------------------------------------------------------


def test_records_reader_skips_a_cut_line_and_duplicates(tmp_path):
    path = tmp_path / "records.jsonl"
    a = {"task": "sr4", "method": "m", "steps": 2, "image_id": "b.png", "index": 1, "psnr": 1.0}
    b = dict(a, image_id="a.png", index=0, psnr=2.0)
    store.append_line(path, a)
    store.append_line(path, b)
    store.append_line(path, dict(a, psnr=99.0))  # a duplicate: the first one counts
    with open(path, "ab") as f:  # a writer killed mid-line
        f.write(json.dumps(dict(a, image_id="c.png", index=2))[:25].encode())
    assert [r["psnr"] for r in store.read_records(tmp_path)] == [2.0, 1.0]  # sorted by index
    store.repair_tail(path)
    store.append_line(path, dict(a, image_id="d.png", index=3, psnr=4.0))
    assert path.read_bytes().endswith(b"\n") and len(path.read_bytes().split(b"\n")) == 6
    assert [r["psnr"] for r in store.read_records(tmp_path)] == [2.0, 1.0, 4.0]


# --------------------------------------------------------------------------------------------
# records against an independent recomputation
# --------------------------------------------------------------------------------------------


def test_records_and_tables_match_a_direct_recomputation(reference, data):
    files = (reference / "files.txt").read_text().splitlines()
    assert len(files) == fx.N_IMAGES and all((data / f).is_file() for f in files)
    recs = store.read_records(reference)
    assert len(recs) == fx.N_RECORDS
    res = json.loads((reference / "results.json").read_text())
    clean_feats = []
    for task_name, method, steps in [("sr4", "fake-pix", 3), ("denoise", "fake-lat", 4)]:
        task = make_task(task_name, (3, fx.SIZE, fx.SIZE))
        psnrs, feats, clean_feats = [], [], []
        for i, f in enumerate(files):
            x = load_eval_image(data / f, fx.SIZE).unsqueeze(0)
            y = task.operator.measure(x, task.sigma_y, make_generator(image_seed(fx.SEED, f + "#measurement")))
            prior = fx.fake_load_prior("fake:pixel" if method == "fake-pix" else "fake:latent", "cpu", "fp32", None)
            x_hat = fx.fake_restore(prior, task.operator, y, sigma_y=task.sigma_y, steps=steps,
                                    generator=make_generator(image_seed(fx.SEED, f))).clamp(-1, 1)  # fmt: skip
            mse = float(((x_hat.double() - x.double()) ** 2).mean())
            rec = next(r for r in recs if (r["task"], r["method"], r["steps"], r["image_id"]) == (task_name, method, steps, f))
            assert rec["index"] == i
            assert rec["psnr"] == pytest.approx(10 * math.log10(4.0 / mse), abs=1e-9)
            assert rec["consistency"] == pytest.approx(float((task.operator.H(x_hat) - y).norm()), rel=1e-5)
            psnrs.append(rec["psnr"])
            feats.append(fx.fake_features(x_hat)[0])
            clean_feats.append(fx.fake_features(x)[0])
            base = next(r for r in recs if (r["task"], r["method"], r["image_id"]) == (task_name, "baseline", f))
            assert base["steps"] == 0
            assert base["psnr"] == pytest.approx(float(metrics.psnr(task.baseline(y), x)[0]), abs=1e-9)
        row = next(r for r in res["tables"][task_name] if r["method"] == method)
        assert row["n_images"] == fx.N_IMAGES and row["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-12)
        assert row["fid"] == pytest.approx(metrics.fid_from_features(np.stack(feats), np.stack(clean_feats)), rel=1e-6)
        assert row["kid"] == pytest.approx(metrics.kernel_inception_distance(np.stack(feats), np.stack(clean_feats))[0], rel=1e-6)
    # clean features were stored once per image and are the fake Inception's
    stored = np.stack([np.load(reference / "features" / "clean" / f"{i:05d}.npy") for i in range(fx.N_IMAGES)])
    np.testing.assert_allclose(stored, np.stack(clean_feats), rtol=1e-6)
    # the throughput of every method cell (tables + the Figure 7 sweep), batch 2, on the CPU
    th = store.read_jsonl(reference / "throughput.jsonl")
    cells = {(t["task"], t["method"], t["steps"]) for t in th}
    assert cells == {("sr4", "fake-pix", 3), ("sr4", "fake-lat", 4), ("sr4", "fake-lat", 2),
                     ("denoise", "fake-pix", 3), ("denoise", "fake-lat", 4)}  # fmt: skip
    assert all(t["batch_size"] == 2 and t["device"] == "cpu" and t["samples_per_s"] > 0 for t in th)


# --------------------------------------------------------------------------------------------
# resume, sharding
# --------------------------------------------------------------------------------------------


def test_run_killed_midway_resumes_to_the_uninterrupted_result(reference, data, tmp_path):
    run = tmp_path / "run"
    argv = fx.evaluate_argv(data, run)
    proc = _subprocess(argv, FAKE_METHOD_SLEEP="0.15")
    records = run / "records.jsonl"
    _kill_after_records(proc, records, 8, timeout=60)
    done = records.read_bytes().count(b"\n")
    assert 8 <= done < fx.N_RECORDS
    assert not (run / "results.json").exists()

    resumed = _subprocess(argv)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    got = fx.records(run)
    keys = [(r["task"], r["method"], r["steps"], r["image_id"]) for r in got]
    assert len(keys) == len(set(keys)) == fx.N_RECORDS  # none twice, none missing
    assert got == fx.records(reference)
    assert fx.results(run) == fx.results(reference)


def test_nproc_2_gives_the_single_process_records_and_tables(reference, data, tmp_path):
    run = tmp_path / "run"
    proc = _subprocess(fx.evaluate_argv(data, run, "--nproc", "2"))
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert fx.records(run) == fx.records(reference)
    assert fx.results(run) == fx.results(reference)
    # images of both ranks' shares are where the records say
    assert all((run / r["image"]).is_file() for r in fx.records(run) if "image" in r)


def test_killing_the_parent_of_nproc_workers_stops_them(data, tmp_path):
    """``kill`` of ``evaluate --nproc 2`` (SIGKILL: no clean-up in the parent) must not leave its workers
    computing: they get SIGTERM when their parent dies, so the records stop growing. Started as a shell
    script starts a background job (``cmd &``), with SIGINT ignored: torch's own parent-death signal for
    spawned workers is SIGINT, which such workers inherit as ignored and outlive their parent."""
    run = tmp_path / "run"
    proc = _subprocess(fx.evaluate_argv(data, run, "--nproc", "2"), FAKE_METHOD_SLEEP="0.15",
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
    records = run / "records.jsonl"
    _kill_after_records(proc, records, 4, timeout=120)
    time.sleep(2)  # a live worker writes a record every ~0.15 s
    done = records.read_bytes().count(b"\n")
    time.sleep(2)
    assert records.read_bytes().count(b"\n") == done < fx.N_RECORDS


@pytest.mark.slow
def test_torchrun_gives_the_single_process_records_and_tables(reference, data, tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    run = tmp_path / "run"
    argv = fx.evaluate_argv(data, run)
    argv[argv.index("--n")] = "--num-images"  # torchrun's own parser reads --n as an abbreviation
    proc = subprocess.run(
        ["torchrun", "--nproc_per_node=2", "-m", "diffrestore", *argv],
        cwd=fx.ROOT, env=fx.subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert fx.records(run) == fx.records(reference)
    assert fx.results(run) == fx.results(reference)


# --------------------------------------------------------------------------------------------
# rerunning: nothing to do, extensions, refusals
# --------------------------------------------------------------------------------------------


def _copy(reference: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run


def test_rerun_of_a_finished_run_loads_no_model(reference, data, tmp_path, monkeypatch):
    run = _copy(reference, tmp_path)
    before = (run / "records.jsonl").read_bytes(), (run / "throughput.jsonl").read_bytes()

    def no_model(*a, **k):
        raise AssertionError("a finished run loaded a model")

    monkeypatch.setattr(fx, "fake_load_prior", no_model)  # what install() puts in place
    monkeypatch.setattr(fx, "fake_load_feature_extractor", no_model)
    monkeypatch.setattr(fx, "fake_restore", no_model)
    rc, out, err = fx.run_cli(monkeypatch, fx.evaluate_argv(data, run))
    assert rc == 0, err
    assert ((run / "records.jsonl").read_bytes(), (run / "throughput.jsonl").read_bytes()) == before
    assert fx.results(run) == fx.results(reference)


def test_new_sweep_steps_extend_the_run_with_only_the_missing_records(reference, data, tmp_path, monkeypatch):
    run = _copy(reference, tmp_path)
    rc, out, err = fx.run_cli(monkeypatch, fx.evaluate_argv(data, run, "--fig7-steps", "fake-pix:1,3", "--save-images"))
    assert rc == 0, err
    new = [r for r in fx.records(run) if r not in fx.records(reference)]
    assert {(r["task"], r["method"], r["steps"]) for r in new} == {("sr4", "fake-pix", 1)}  # 3 = table steps, kept
    assert len(new) == fx.N_IMAGES
    # --save-images: every new restoration is stored where its record says
    assert sorted(r["image"] for r in new) == [f"images/sr4/fake-pix-1/{i:05d}.png" for i in range(fx.N_IMAGES)]
    assert all((run / r["image"]).is_file() for r in new)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["grid"]["fig7_steps"] == {"fake-lat": [2, 4], "fake-pix": [1, 3]}
    res, ref = fx.results(run), fx.results(reference)
    assert res["tables"] == ref["tables"]
    assert {(p["method"], p["steps"]) for p in res["fig7"]["points"]} == {
        ("fake-lat", 2), ("fake-lat", 4), ("fake-pix", 1), ("fake-pix", 3)
    }
    # options left out are taken from config.json: a bare rerun has nothing to do
    rc, out, err = fx.run_cli(monkeypatch, ["evaluate", "--out", str(run), "--device", "cpu", "--no-progress"])
    assert rc == 0, err
    assert len(fx.records(run)) == fx.N_RECORDS + fx.N_IMAGES


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--seed", "4"], "seed 3 -> 4"),
        (["--size", "64"], "size 32 -> 64"),
        (["--n", "5"], "n 6 -> 5"),
        (["--steps", "fake-pix:5,fake-lat:4"], "steps of fake-pix 3 -> 5"),
        (["--pixel-prior", "fake:other"], "pixel prior fake:pixel -> fake:other"),
        (["--dtype", "bf16"], "dtype fp32 -> bf16"),
    ],
)
def test_changed_settings_are_refused(reference, data, tmp_path, monkeypatch, change, expected):
    run = _copy(reference, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    argv = fx.evaluate_argv(data, run)
    for i in range(0, len(change), 2):  # replace the option's value (or add it)
        if change[i] in argv:
            argv[argv.index(change[i]) + 1] = change[i + 1]
        else:
            argv += change[i : i + 2]
    rc, out, err = fx.run_cli(monkeypatch, argv)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("diffrestore: error: ")
    assert f"{run} was made with different settings: " in err and expected in err and "use a new --out" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_method_options_reach_the_method_are_recorded_and_pinned(reference, data, tmp_path, monkeypatch):
    """--options fake-pix:noise=0 makes fake-pix return its noiseless upsampling (an independent
    recomputation), is stored in config.json and tables.md, and a rerun with other options is refused."""
    run = tmp_path / "run"
    argv = fx.evaluate_argv(data, run, "--options", "fake-pix:noise=0")
    rc, out, err = fx.run_cli(monkeypatch, argv)
    assert rc == 0, err
    assert json.loads((run / "config.json").read_text())["grid"]["options"] == {"fake-pix": {"noise": 0.0}}
    assert "- options of fake-pix: noise=0.0" in (run / "tables.md").read_text()
    files = (run / "files.txt").read_text().splitlines()
    task = make_task("sr4", (3, fx.SIZE, fx.SIZE))
    for f in files:
        x = load_eval_image(data / f, fx.SIZE).unsqueeze(0)
        y = task.operator.measure(x, task.sigma_y, make_generator(image_seed(fx.SEED, f + "#measurement")))
        upsampled = np.repeat(np.repeat(y.numpy(), 4, axis=-2), 4, axis=-1).clip(-1, 1)  # nearest, noise 0
        mse = float(((upsampled.astype(np.float64) - x.double().numpy()) ** 2).mean())
        rec = next(r for r in store.read_records(run) if (r["task"], r["method"], r["image_id"]) == ("sr4", "fake-pix", f))
        assert rec["psnr"] == pytest.approx(10 * math.log10(4.0 / mse), abs=1e-6)
    # the latent method had no options: its records are the reference's, bit for bit
    same = [r for r in fx.records(run) if r["method"] == "fake-lat"]
    assert len(same) == fx.N_IMAGES * 3 and same == [r for r in fx.records(reference) if r["method"] == "fake-lat"]
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    argv[argv.index("--options") + 1] = "fake-pix:noise=0.5"
    rc, out, err = fx.run_cli(monkeypatch, argv)
    assert rc == 2 and "options of fake-pix {'noise': 0.0} -> {'noise': 0.5}" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_first_instead_of_random_subset_is_refused(reference, data, tmp_path, monkeypatch):
    run = _copy(reference, tmp_path)
    argv = fx.evaluate_argv(data, run)
    argv[argv.index("--n")] = "--first"
    rc, out, err = fx.run_cli(monkeypatch, argv)
    assert rc == 2 and "was made with different settings: first False -> True" in err


def test_other_data_folder_is_refused(reference, data, tmp_path, monkeypatch):
    run = _copy(reference, tmp_path)
    other = fx.make_data(tmp_path / "other")
    rc, out, err = fx.run_cli(monkeypatch, fx.evaluate_argv(other, run))
    assert rc == 2 and "was made with different settings: data " in err


# --------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["missing data", "unknown task", "unknown method", "no prior", "bad prior", "out under a file", "foreign folder", "steps of other method",
     "unknown option", "options of other method", "option value out of range", "samples not positive"],
)
def test_bad_input_is_one_line_and_leaves_no_files(data, tmp_path, monkeypatch, case):
    out = tmp_path / "run"
    argv = fx.evaluate_argv(data, out)

    def set_opt(name, value):
        argv[argv.index(name) + 1] = value

    if case == "missing data":
        set_opt("--data", str(tmp_path / "nope"))
    elif case == "unknown task":
        set_opt("--tasks", "sr4,sr5")
    elif case == "unknown method":
        set_opt("--methods", "fake-pix,nope")
    elif case == "no prior":
        i = argv.index("--pixel-prior")
        del argv[i : i + 2]
    elif case == "bad prior":  # fails when the prior is loaded, after the run folder was made
        set_opt("--pixel-prior", "fake:broken")
    elif case == "out under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
        set_opt("--out", str(out))
    elif case == "foreign folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "steps of other method":
        set_opt("--steps", "ddrm:5")
    elif case == "unknown option":
        argv += ["--options", "fake-pix:bogus=1"]
    elif case == "options of other method":
        argv += ["--options", "ddrm:eta=1"]
    elif case == "option value out of range":  # checked before the run folder exists, so a corrected rerun may use it
        argv += ["--options", "fake-pix:noise=-1"]
    elif case == "samples not positive":
        argv += ["--options", "fake-lat:samples=0"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc, stdout, err = fx.run_cli(monkeypatch, argv)
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("diffrestore: error: "), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_samples_option_records_the_spread_of_the_draws(data, tmp_path, monkeypatch):
    """fake-pix:samples=2: fake-pix's draws differ only by 0.05 * N(0, 1) per pixel, so the std of two
    draws is 0.05 |n1 - n2| / sqrt(2), mean 0.05 * 2 / sqrt(2 pi) ~ 0.0399 (a closed form); the
    records keep it, tables.md reports it, and the method without the option records none."""
    run = tmp_path / "run"
    rc, out, err = fx.run_cli(monkeypatch, fx.evaluate_argv(data, run, "--options", "fake-pix:samples=2"))
    assert rc == 0, err
    recs = [r for r in store.read_records(run) if r["method"] == "fake-pix"]
    mean_std = sum(r["sample_std"] for r in recs) / len(recs)
    assert mean_std == pytest.approx(0.05 * 2 / math.sqrt(2 * math.pi), rel=0.05)
    assert all(-1 <= r["std_error_correlation"] <= 1 for r in recs)
    assert not any("sample_std" in r for r in store.read_records(run) if r["method"] != "fake-pix")
    tables = (run / "tables.md").read_text()
    for task in ("sr4", "denoise"):
        per_task = [r["sample_std"] for r in recs if r["task"] == task]
        section = tables.split(f": {task}\n")[1].split("## Table")[0]
        assert "Spread of the samples each restoration averages" in section
        assert f"{sum(per_task) / len(per_task):.4f}" in section
