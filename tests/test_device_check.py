"""bench/device_check.py --dry-run: the GPU check's code (golden tensors on the device, the speed grid with and
without torch.compile, the 2-rank torchrun evaluation and all-reduce) at tiny sizes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_passes_every_check_and_times_every_row(tmp_path, shared):
    out = tmp_path / "dc.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "device_check.py"), "--dry-run", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    checks = {c["check"]: c for c in result["checks"]}
    assert checks["golden pytest (CPU)"]["ok"] is None  # the full run only
    assert all(c["ok"] for name, c in checks.items() if name != "golden pytest (CPU)"), checks
    for name in ("golden ADM, 20 calls on cpu", "golden LDM-SR UNet + first stage on cpu"):
        assert float(checks[name]["detail"].split()[-1]) <= 1e-4
    assert checks["torchrun 2 ranks: evaluate on cpu"]["detail"].startswith("6 records")  # 2 images x (ddrm, srldm, baseline)
    rows = result["rows"]
    assert all("skipped" not in r and r["seconds"] > 0 for r in rows)
    combos = {(r["method"], r["dtype"], r["compile"], r["batch"], r["steps"]) for r in rows}
    assert ("ddrm", "bf16", True, 1, 2) in combos and ("srldm", "fp32", False, 2, 2) in combos and len(combos) == len(rows) == 15
    assert "ADM-256" in proc.stdout and "img/s" in proc.stdout  # the table
