"""``diffrestore train`` run as a user runs it (a subprocess) on inputs it must refuse.

Each row: exit status 2, exactly one line on stderr, starting ``diffrestore: error:`` and saying what
is wrong, no traceback, and nothing created or changed in the folder the command was given (no empty
``--run`` folder, no checkpoint, no log).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--steps", "1", "--batch", "1", "--crop", "16", "--channels", "8,16", "--norm-groups", "4",
        "--holdout-every", "0", "--no-progress", "--threads", "1"]  # fmt: skip


def start_train(cwd: Path, *argv: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "diffrestore", "train", *argv], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_train(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    return finish(start_train(cwd, *argv))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def assert_one_line_refusal(proc: subprocess.CompletedProcess, expect: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffrestore: error: "), proc.stderr
    assert expect in lines[0], lines[0]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stdout == ""


@pytest.fixture(scope="module")
def photos(shared, tmp_path_factory) -> Path:
    """Two training photos (short side 256)."""
    src = sorted((shared / "data" / "train").glob("*.jpg"))[:2]
    if len(src) < 2:
        pytest.skip("shared/data/train not found")
    d = tmp_path_factory.mktemp("photos")
    for f in src:
        shutil.copy(f, d / f.name)
    return d


def _plain_checkpoint(kind: str) -> dict:
    """A well-formed checkpoint dict of ``kind`` (what a resume checks before building a model)."""
    return {"kind": kind, "model_cfg": {"block_out_channels": [8, 16]}, "model": {}, "ema": {}, "opt": {},
            "rng": {}, "step": 1, "elapsed": 0.0, "options": {}}  # fmt: skip


def _plant(case: str, work: Path, photos: Path) -> list[str]:
    """Set up ``case`` in ``work``; returns the command line (after ``train``)."""
    run = ["--run", str(work / "run")]
    data = ["--data", str(photos)]
    if case in ("truncated-image", "undecodable-ppm"):
        bad = work / "data"
        shutil.copytree(photos, bad)
        if case == "truncated-image":
            (bad / "zz.jpg").write_bytes(next(photos.glob("*.jpg")).read_bytes()[:3000])
        else:  # a suffix evaluation reads: training must read (and here refuse) it too, not skip it
            (bad / "zz.ppm").write_bytes(b"P6\n64 64\n255\n" + b"\x00" * 100)
        return ["pixel", "--data", str(bad), *run, *TINY]
    if case in ("corrupt-checkpoint", "other-kind-checkpoint", "truncated-checkpoint"):
        (work / "run").mkdir()
        ckpt = work / "run" / "checkpoint.pt"
        if case == "corrupt-checkpoint":
            ckpt.write_bytes(b"PK\x03\x04 not really a zip archive")
        elif case == "truncated-checkpoint":
            torch.save(_plain_checkpoint("pixel"), ckpt)
            ckpt.write_bytes(ckpt.read_bytes()[:200])
        else:
            torch.save(_plain_checkpoint("autoencoder"), ckpt)
        return ["pixel", *data, *run, *TINY, "--resume"]
    if case == "run-is-a-file":
        (work / "run").write_text("not a folder")
        return ["pixel", *data, *run, *TINY]
    extra = {
        "crop-7": ["--crop", "7"], "steps-negative": ["--steps", "-1"], "steps-zero": ["--steps", "0"],
        "lr-nan": ["--lr", "nan"], "log-every-0": ["--log-every", "0"], "device-bogus": ["--device", "bogus"],
        "norm-groups-3": ["--norm-groups", "3"], "resume-nothing": ["--resume"],
    }[case]  # fmt: skip
    return ["pixel", *data, *run, *TINY, *extra]


ROWS = {
    "truncated-image": "zz.jpg: not a readable image",
    "undecodable-ppm": "zz.ppm: not a readable image",
    "corrupt-checkpoint": "checkpoint.pt: not a readable checkpoint",
    "truncated-checkpoint": "checkpoint.pt: not a readable checkpoint",
    "other-kind-checkpoint": "a checkpoint of a 'autoencoder' run, not of 'pixel'",
    "run-is-a-file": "exists and is not a folder",
    "crop-7": "--crop 7: must be a positive multiple of 2",
    "steps-negative": "--steps -1: must be a whole number >= 1",
    "steps-zero": "--steps 0: must be a whole number >= 1",
    "lr-nan": "--lr nan: must be a finite number > 0",
    "log-every-0": "--log-every 0",
    "device-bogus": "--device 'bogus': not a device",
    "norm-groups-3": "--norm-groups 3: must divide every --channels width",
    "resume-nothing": "no checkpoint to resume from",
}


@pytest.fixture(scope="module")
def refusals(photos, tmp_path_factory) -> dict:
    """Every row run at once (a few processes at a time; most of each is Python and torch starting):
    case -> (the finished process, the folder snapshot before, the snapshot after)."""
    planted = {}
    for case in sorted(ROWS):
        work = tmp_path_factory.mktemp(case)
        planted[case] = (work, _plant(case, work, photos))
    results, pending = {}, sorted(planted)
    while pending:
        batch, pending = pending[:4], pending[4:]
        procs = {}
        for case in batch:
            work, argv = planted[case]
            procs[case] = (snapshot(work), start_train(work, *argv))
        for case, (before, proc) in procs.items():
            results[case] = (finish(proc), before, snapshot(planted[case][0]))
    return results


@pytest.mark.parametrize("case", sorted(ROWS))
def test_train_refuses_in_one_line_and_leaves_nothing(case, refusals):
    proc, before, after = refusals[case]
    assert_one_line_refusal(proc, ROWS[case])
    assert after == before


def test_latent_autoencoder_crop_not_a_multiple_of_its_downsampling(photos, tmp_path):
    """The default autoencoder (3 widths) halves its input twice: crop 7 (and 6) cannot be encoded."""
    for crop in ("7", "6"):
        proc = run_train(tmp_path, "latent-sr", "autoencoder", "--data", str(photos), "--run", str(tmp_path / "run"),
                         "--steps", "1", "--crop", crop, "--no-progress")  # fmt: skip
        assert_one_line_refusal(proc, f"--crop {crop}: must be a positive multiple of 4")
    assert list(tmp_path.iterdir()) == []


def test_train_on_good_inputs_succeeds(photos, tmp_path):
    """The control row: the same tiny command line trains (so the refusals above are about their input)."""
    proc = run_train(tmp_path, "pixel", "--data", str(photos), "--run", str(tmp_path / "run"), *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"checkpoint.pt", "log.jsonl"}
