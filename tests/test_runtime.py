"""The allocator setting applied at import (``diffrestore.runtime``) and the ``auto`` precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffrestore import runtime

SRC = Path(__file__).resolve().parents[1] / "src"

# A child that imports diffrestore (after torch, as a user's script would), allocates a 64 MiB tensor
# and prints how much the brk heap grew: glibc's defaults serve any block over 32 MiB (the largest
# dynamic mmap threshold) by a fresh mmap, which the tuned allocator turns off (M_MMAP_MAX 0).
HEAP = """
import json, torch, diffrestore
from diffrestore import runtime
def heap():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            a, b = line.split()[0].split("-")
            return int(b, 16) - int(a, 16)
    return 0
h0 = heap()
t = torch.empty(64 * 1024 * 1024, dtype=torch.uint8)
t.fill_(1)
print(json.dumps({"tuned": runtime.allocator_tuned(), "heap_growth": heap() - h0}))
"""

# A child that restores a random sr4 measurement with the golden tiny ADM prior (3 DDRM steps) and
# prints the sha256 of the restored tensor's bytes.
RESTORE = """
import hashlib, json, sys, torch, diffrestore
from diffrestore import runtime
from diffrestore.operators.tasks import make_task
from diffrestore.restoration import run_method
from diffrestore.priors.loading import load_prior
torch.set_num_threads(1)
prior = load_prior(sys.argv[1], adm_config={"num_head_channels": 16}, dtype="fp32")
task = make_task("sr4", (3, 64, 64))
x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
with torch.no_grad():
    out = run_method("ddrm", {"pixel": prior}, task, task.operator.H(x), steps=3, seed=5).x_hat
print(json.dumps({"tuned": runtime.allocator_tuned(), "sha": hashlib.sha256(out.numpy().tobytes()).hexdigest()}))
"""


def _child(code: str, *args: str, **env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != runtime.OPT_OUT}
    full.update(PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", **env)
    proc = subprocess.run([sys.executable, "-c", code, *args], env=full, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


glibc_only = pytest.mark.skipif(runtime._glibc() is None, reason="the allocator setting applies to glibc only")


@glibc_only
def test_setting_takes_effect_after_torch_is_imported():
    """Tuned, a large tensor lives in the heap (reused between network calls, no fresh page faults);
    with DIFFRESTORE_MALLOC=system it is glibc's usual mmap. The fault and system-time savings this
    buys are measured by bench/scaling.py, not here (they depend on the machine's load)."""
    on, off = _child(HEAP), _child(HEAP, DIFFRESTORE_MALLOC="system")
    assert on["tuned"] and not off["tuned"]
    assert on["heap_growth"] >= 60 * 2**20
    assert off["heap_growth"] < 2**20


@glibc_only
def test_user_malloc_environment_is_left_alone():
    assert not _child(HEAP, MALLOC_MMAP_MAX_="65536")["tuned"]


@glibc_only
def test_restore_is_bit_identical_with_the_setting_on_and_off(shared):
    ckpt = str(shared / "golden" / "ddrm" / "unet_state_dict.pt")
    on, off = _child(RESTORE, ckpt), _child(RESTORE, ckpt, DIFFRESTORE_MALLOC="system")
    assert on["tuned"] and not off["tuned"]
    assert on["sha"] == off["sha"]


def test_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(runtime, "_tuned", False)
    monkeypatch.setattr(runtime, "_glibc", lambda: None)
    assert runtime.tune_allocator() is False


def test_auto_dtype_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.auto_dtype("cpu") == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.auto_dtype("cpu") == "fp32"
    assert runtime.auto_dtype("meta") == "fp32"


def test_native_bf16_read_from_cpu_flags():
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    expected = bool(flags & {"avx512_bf16", "amx_bf16"}) and torch.backends.mkldnn.is_available()
    assert runtime.cpu_has_native_bf16() == expected


def test_fp16_on_cpu_warns_in_one_line_and_only_there(capsys, monkeypatch):
    monkeypatch.setattr(runtime, "auto_dtype", lambda device: "bf16")
    assert runtime.pick_dtype("fp16", "cpu") == "fp16"
    assert capsys.readouterr().err == "diffrestore: warning: fp16 on a CPU runs about 15x slower than fp32; use --dtype auto or bf16\n"
    assert [runtime.pick_dtype(name, "cpu") for name in ("bf16", "fp32", "auto", None)] == ["bf16", "fp32", "bf16", "bf16"]
    assert runtime.pick_dtype("fp16", "cuda") == "fp16"
    assert capsys.readouterr().err == ""
