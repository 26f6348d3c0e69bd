"""The README's commands run as written (with tiny inputs and one step), so the README stays true.

Installs (`pip install ...`) and the test command are what `.ci/run` runs; `diffrestore demo` has its
own tests (tests/test_demo.py); `app` and `evaluate --preset paper` (a 2000-image grid) are checked
to parse. Everything else is run."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)
ONLY_PARSED = {"app", "evaluate", "report", "demo"}


def _shell_commands() -> list[list[str]]:
    out = []
    for lang, body in BLOCKS:
        if lang:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            for part in filter(None, (p.strip() for p in line.split("&&"))):
                out.append(shlex.split(part))
    return out


COMMANDS = [c for c in _shell_commands() if c and c[0] == "diffrestore"]


def test_the_readme_names_commands_and_stays_short():
    assert len(COMMANDS) >= 8
    assert len(README.splitlines()) <= 200


@pytest.fixture
def inputs(tmp_path) -> Path:
    """Small real-looking inputs under the names the README uses."""
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((32, 32), Image.BILINEAR)
    noisy = np.clip(np.asarray(photo, dtype=np.float64) + np.random.default_rng(0).normal(0, 12, (32, 32, 3)), 0, 255)
    photo.save(tmp_path / "photo.png")
    photo.save(tmp_path / "photo.jpg")
    photo.resize((16, 16), Image.BICUBIC).save(tmp_path / "small.png")
    photo.resize((16, 12), Image.BICUBIC).save(tmp_path / "photo_1000x750.png")
    Image.fromarray(noisy.astype(np.uint8)).save(tmp_path / "noisy.png")
    return tmp_path


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c[:3]) for c in COMMANDS])
def test_readme_command_runs(argv, inputs):
    cmd = [sys.executable, "-m", "diffrestore", *argv[1:]]
    if argv[1] in ONLY_PARSED:
        cmd = cmd[:4] + ["--help"]
    elif argv[1] == "restore":
        cmd += ["--steps", "1", "--no-progress", "--max-memory", "8G"]
    done = subprocess.run(cmd, cwd=inputs, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    if argv[1] == "restore":
        out = inputs / argv[argv.index("--out") + 1]
        assert list(out.glob("*.png")) and list(out.glob("*.json"))


def test_readme_python_example_runs(inputs):
    code = next(body for lang, body in BLOCKS if lang == "python")
    subprocess.run([sys.executable, "-c", code], cwd=inputs, check=True, timeout=900)
    assert Image.open(inputs / "restored.png").size == (32, 32)
