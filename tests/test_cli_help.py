"""Every `--help` answers fast because the CLI imports torch and the models only when a command runs."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

COMMANDS = ["restore", "evaluate", "report", "demo", "tasks", "methods", "priors", "doctor", "app", "train"]


def _best_wall(argv: list[str], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        best = min(best, time.perf_counter() - start)
        assert done.returncode == 0, done.stderr
    return best


def test_the_parser_does_not_import_torch():
    code = "import sys; from diffrestore.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_exits_0_in_under_a_second(command):
    argv = [sys.executable, "-m", "diffrestore"] + ([command] if command else []) + ["--help"]
    wall = _best_wall(argv)
    bare = _best_wall([sys.executable, "-c", "pass"])
    assert wall < 1.0, f"{' '.join(argv[2:])}: {wall:.2f} s (python -c pass: {bare:.2f} s)"
