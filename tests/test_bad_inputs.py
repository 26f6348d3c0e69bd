"""The bad-input suite: the ``diffrestore`` command run as a user runs it, over a table of bad files,
bad options, odd folders, malicious files and injected faults.

For every row the command must exit 2 with exactly one stderr line starting ``diffrestore: error:``, no
traceback, and leave no file or folder behind (the workspace listing is the same before and after) -
or, for a valid input, succeed and produce what it should. The refusals that must be cheap (a
decompression bomb, ``--samples 200000``, ``--blur-sigma 1e6``) are also timed.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

ROOT = Path(__file__).resolve().parents[1]
PRIOR = "builtin:pixel-s"
FAST_S = 2.0  # the refusals that must not wait for torch, a model or an SVD

# fault injection: run the CLI in a process whose open(..., "w") raises ENOSPC under one folder
ENOSPC_RUNNER = """
import builtins, errno, os, runpy, sys
_open, _dir = builtins.open, os.environ["FAULT_DIR"]
def _full(file, mode="r", *a, **k):
    if isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(_dir) and any(c in mode for c in "wax"):
        raise OSError(errno.ENOSPC, "No space left on device", str(file))
    return _open(file, mode, *a, **k)
builtins.open = _full
sys.argv[0] = "diffrestore"
runpy.run_module("diffrestore", run_name="__main__")
"""

PLUGINS = {
    # the Inception network is not what these rows test: FID is left out quickly
    "noinception.py": """
from diffrestore.evaluation import seams
def install():
    def unavailable(device):
        raise seams.FeaturesUnavailable("no Inception in the bad-input suite")
    seams.load_feature_extractor = unavailable
""",
    # a worker of --nproc killed as it starts (out-of-memory killer, kill -9)
    "killworker.py": """
import multiprocessing, os, signal
def install():
    if multiprocessing.parent_process() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
""",
}


class Evil:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _png_header_only_bomb(path: Path, side: int) -> None:
    """A valid 1-bit PNG of side x side (all black), written row by row: a few hundred KB on disk."""
    comp = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    data = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    Image.fromarray(_noise(32, 32)).save(d / "ok32.png")
    Image.fromarray(_noise(16, 16, 1)).save(d / "ok16.png")
    Image.fromarray(_noise(48, 48, 2)).save(d / "ok48.png")
    Image.fromarray(_noise(8, 8, 3)).save(d / "tiny8.png")
    Image.fromarray((_noise(32, 32, 4)[..., 0].astype(np.uint16) * 257)).save(d / "i16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.fromarray(_noise(16, 32, 5)).save(d / "exif.jpg", exif=exif)  # stored 32 wide, 16 high
    _png_header_only_bomb(d / "bomb.png", 20000)
    _png_header_only_bomb(d / "big8000.png", 8000)
    (d / "corrupt.png").write_bytes(os.urandom(2048))
    (d / "truncated.png").write_bytes((d / "ok48.png").read_bytes()[:300])
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("not an image\n")
    (d / "page.jpg").write_text("<html><body>hello</body></html>\n")
    (d / "adir.png").mkdir()
    os.mkfifo(d / "fifo.png")
    os.symlink(d / "loop.png", d / "loop.png")
    for name, value in (("nan.tif", np.nan), ("inf.tif", np.inf)):
        a = np.full((32, 32), 0.5, dtype=np.float32)
        a[3, 4] = value
        Image.fromarray(a, mode="F").save(d / name)
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "A" * (8 * 2**20), zip=True)  # 8 MB of text inflating from a few KB
    Image.fromarray(_noise(16, 16)).save(d / "ztxt.png", pnginfo=info)
    (d / "sub").mkdir()
    shutil.copy(d / "ok32.png", d / "sub" / "ok32.png")
    (d / "prior.txt").write_text("weights\n")
    with open(d / "evil.pt", "wb") as f:
        pickle.dump(Evil(d / "PWNED"), f)
    torch.save({"state_dict": Evil(d / "PWNED")}, d / "evil_zip.pt")
    (d / "noweights").mkdir()
    builtin = ROOT / "src" / "diffrestore" / "priors" / "builtin" / "pixel-s"
    for name in ("config.json", "scheduler_config.json"):
        shutil.copy(builtin / name, d / "noweights" / name)
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}}, d / "model.ckpt")
    for name, files in (("data_ok", ["ok32.png", "ok16.png"]), ("data_bad", ["ok32.png", "corrupt.png"]),
                        ("data_bomb", ["ok32.png", "bomb.png"])):
        (d / name).mkdir()
        for f in files:
            shutil.copy(d / f, d / name / f)
    (d / "data_empty").mkdir()
    (d / "plugins").mkdir()
    for name, text in PLUGINS.items():
        (d / "plugins" / name).write_text(text)
    return d


def restore(*extra, img="ok32.png", task="denoise", more=()):
    return ["restore", "{in}/" + img, *more, "--task", task, "--prior", PRIOR, "--no-progress", "--out", "{out}", *extra]


def evaluate(*extra, data="data_ok"):
    return ["evaluate", "--data", "{in}/" + data, "--out", "{out}", "--size", "32", "--tasks", "denoise",
            "--methods", "baseline", "--no-progress", *extra]


def demo(*extra):
    return ["demo", "--out", "{out}", "--no-progress", "--methods", "ddrm", "--tasks", "denoise", *extra]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")

# (id, argv, what the one error line must contain (None: the command must succeed), options)
# options: fast (refused in under FAST_S seconds), plugins, fault ("enospc"), setup (name), check (name)
ROWS = [
    # --- image files --------------------------------------------------------------------------
    ("bomb-20000px", restore(img="bomb.png"), "--max-pixels", {"fast": True}),
    ("bomb-limit-raised", restore("--max-pixels", "1000000000", img="bomb.png"), "--max-memory", {"fast": True}),
    ("8000px-degrade-memory", restore("--degrade", "--max-pixels", "100000000", img="big8000.png"), "estimate", {}),
    ("8000px-default-limit", restore("--degrade", img="big8000.png"), "--max-pixels", {"fast": True}),
    ("corrupt-png", restore(img="corrupt.png"), "not a readable image", {}),
    ("truncated-png", restore(img="truncated.png"), "not a readable image", {}),
    ("empty-file", restore(img="empty.png"), "not a readable image", {}),
    ("text-as-png", restore(img="text.png"), "not a readable image", {}),
    ("html-as-jpg", restore(img="page.jpg"), "not a readable image", {}),
    ("missing-file", restore(img="nothere.png"), "no such file", {}),
    ("directory", restore(img="adir.png"), "directory", {}),
    ("fifo", restore(img="fifo.png"), "not a regular file", {}),
    ("device-file", ["restore", "/dev/zero", "--task", "denoise", "--prior", PRIOR, "--out", "{out}"], "not a regular file", {}),
    ("symlink-loop", restore(img="loop.png"), "loop.png", {}),
    ("float-tiff-nan", restore(img="nan.tif"), "NaN or infinite", {}),
    ("float-tiff-inf", restore(img="inf.tif"), "NaN or infinite", {}),
    ("png-text-chunk-bomb", restore(img="ztxt.png"), "not a readable image", {}),
    ("8x8-degrade", restore("--degrade", "--steps", "1", img="tiny8.png"), "8x8", {}),
    ("mask-corrupt", restore("--steps", "1", "--mask", "{in}/corrupt.png", task="inpaint"), "corrupt.png", {}),
    ("mask-wrong-size", restore("--steps", "1", "--mask", "{in}/ok16.png", task="inpaint"), "mask", {}),
    ("same-stem-twice", restore("--steps", "1", more=["{in}/sub/ok32.png"]), "stem", {}),
    # --- restore options ------------------------------------------------------------------------
    ("steps-0", restore("--steps", "0"), "--steps", {"fast": True}),
    ("steps-negative", restore("--steps", "-3"), "--steps", {"fast": True}),
    ("steps-not-a-number", restore("--steps", "abc"), "--steps", {"fast": True}),
    ("steps-beyond-schedule", restore("--steps", "1000000"), "timesteps", {}),
    ("samples-200000", restore("--samples", "200000"), "--samples", {"fast": True}),
    ("samples-0", restore("--samples", "0"), "samples", {}),
    ("samples-as-option-200000", restore("--option", "samples=200000"), "--max-memory", {}),
    ("blur-sigma-1e6", restore("--blur-sigma", "1e6", task="deblur"), "--blur-sigma 100", {"fast": True}),
    ("blur-sigma-1e4", restore("--blur-sigma", "1e4", task="deblur"), "--blur-sigma 100", {"fast": True}),
    ("blur-sigma-negative", restore("--blur-sigma", "-1", task="deblur"), "positive", {"fast": True}),
    ("blur-sigma-nan", restore("--blur-sigma", "nan", task="deblur"), "positive", {"fast": True}),
    ("blur-sigma-inf", restore("--blur-sigma", "inf", task="deblur"), "positive", {"fast": True}),
    pytest.param("device-cuda-without-gpu", restore("--device", "cuda"), "CUDA", {}, marks=NO_CUDA),
    ("device-bogus", restore("--device", "bogus"), "bogus", {"fast": True}),
    ("device-cuda-7", restore("--device", "cuda:7"), "cuda:7", {}),
    ("scale-0", restore("--scale", "0", task="sr4"), "scale", {}),
    ("scale-on-deblur", restore("--scale", "3", task="deblur"), "scale", {}),
    ("task-unknown", restore(task="nope"), "unknown task", {}),
    ("method-unknown", restore("--method", "nope"), "unknown method", {}),
    ("method-needs-latent-prior", restore("--method", "srldm", "--steps", "1"), "latent prior", {}),
    ("prior-unknown-builtin", ["restore", "{in}/ok32.png", "--task", "denoise", "--prior", "builtin:nope", "--out", "{out}"], "nope", {}),
    ("prior-missing-path", ["restore", "{in}/ok32.png", "--task", "denoise", "--prior", "{in}/none.pt", "--out", "{out}"], "none.pt", {}),
    ("prior-text-file", ["restore", "{in}/ok32.png", "--task", "denoise", "--prior", "{in}/prior.txt", "--out", "{out}"], "prior.txt", {}),
    ("prior-malicious-pickle", ["restore", "{in}/ok32.png", "--task", "denoise", "--prior", "{in}/evil.pt", "--out", "{out}"], "evil.pt", {"check": "not_pwned"}),
    ("prior-malicious-torch-zip", ["restore", "{in}/ok32.png", "--task", "denoise", "--prior", "{in}/evil_zip.pt", "--out", "{out}"], "evil_zip.pt", {"check": "not_pwned"}),
    ("prior-folder-without-weights", ["restore", "{in}/ok32.png", "--task", "denoise", "--prior", "{in}/noweights", "--out", "{out}"],
     "diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin", {}),
    ("prior-ckpt-without-yaml", ["restore", "{in}/ok32.png", "--task", "denoise", "--method", "srldm", "--prior", "{in}/model.ckpt",
                                 "--out", "{out}"], "put the model's config beside it", {}),
    ("sigma-y-negative", restore("--sigma-y", "-1"), "sigma_y", {}),
    ("option-malformed", restore("--option", "eta"), "NAME=VALUE", {}),
    ("option-unknown", restore("--option", "nope=1"), "nope", {}),
    ("adm-config-bad-json", restore("--adm-config", "{bad"), "JSON", {}),
    ("adm-config-not-object", restore("--adm-config", "[1]"), "JSON object", {}),
    ("max-pixels-0", restore("--max-pixels", "0"), "--max-pixels", {"fast": True}),
    ("max-memory-garbage", restore("--max-memory", "lots"), "--max-memory", {"fast": True}),
    ("max-memory-tiny", restore("--max-memory", "1K"), "--max-memory", {"fast": True}),
    ("dtype-unknown", restore("--dtype", "fp8"), "--dtype", {"fast": True}),
    ("task-missing", ["restore", "{in}/ok32.png", "--prior", PRIOR, "--out", "{out}"], "--task", {"fast": True}),
    ("out-is-a-file", restore("--steps", "1"), "not a folder", {"setup": "out_file"}),
    ("disk-full-restore", restore("--steps", "1"), "no space left", {"fault": "enospc"}),
    # --- valid inputs: they must work ----------------------------------------------------------
    ("valid-default-steps-recorded", restore(), None, {"check": "steps_20"}),
    ("valid-scale-3", restore("--degrade", "--scale", "3", "--steps", "1", img="ok48.png", task="sr4"), None, {"check": "size_48"}),
    ("valid-exif-orientation", restore("--steps", "1", img="exif.jpg"), None, {"check": "exif_size"}),
    ("valid-16-bit", restore("--steps", "1", img="i16.png"), None, {}),
    # --- evaluate -------------------------------------------------------------------------------
    ("eval-corrupt-image", evaluate(data="data_bad"), "--skip-bad", {}),
    ("eval-bomb-image", evaluate(data="data_bomb"), "--max-pixels", {}),
    ("eval-skip-bad", evaluate("--skip-bad", data="data_bad"), None, {"plugins": "noinception", "check": "skipped"}),
    ("eval-steps-beyond-schedule", evaluate("--methods", "ddrm", "--pixel-prior", PRIOR, "--steps", "1000000"), "timesteps",
     {"check": "corrected_evaluate"}),
    ("eval-steps-0", evaluate("--steps", "0"), "--steps", {}),
    ("eval-steps-method-0", evaluate("--steps", "ddrm:0"), "--steps", {}),
    ("eval-steps-not-a-number", evaluate("--steps", "x"), "--steps", {}),
    ("eval-device-bogus", evaluate("--device", "bogus"), "bogus", {}),
    pytest.param("eval-device-cuda-without-gpu", evaluate("--device", "cuda"), "CUDA", {}, marks=NO_CUDA),
    ("eval-data-missing", evaluate(data="nothere"), "does not exist", {}),
    ("eval-data-empty", evaluate(data="data_empty"), "no images", {}),
    ("eval-out-is-a-file", evaluate(), "not a folder", {"setup": "out_file"}),
    ("eval-out-not-a-run", evaluate(), "not empty", {"setup": "out_foreign"}),
    ("eval-size-4", evaluate("--size", "4"), "--size", {}),
    ("eval-task-unknown", evaluate("--tasks", "nope"), "unknown task", {}),
    ("eval-method-unknown", evaluate("--methods", "nope"), "unknown method", {}),
    ("eval-nproc-0", evaluate("--nproc", "0"), "--nproc", {}),
    ("eval-max-memory-tiny", evaluate("--max-memory", "1K"), "--max-memory", {}),
    ("eval-max-pixels-0", evaluate("--max-pixels", "0"), "--max-pixels", {}),
    ("eval-disk-full", evaluate(), "no space left", {"fault": "enospc", "plugins": "noinception"}),
    ("eval-worker-killed", evaluate("--nproc", "2"), "worker died", {"plugins": "killworker"}),
    # --- report ---------------------------------------------------------------------------------
    ("report-malformed-record", ["report", "{out}"], None, {"setup": "run_with_bad_record", "check": "warned_once"}),
    ("report-missing-run", ["report", "{out}"], "no such run folder", {}),
    ("report-not-a-run", ["report", "{out}"], "no config.json", {"setup": "out_foreign"}),
    ("report-corrupt-config", ["report", "{out}"], "config", {"setup": "run_with_bad_config"}),
    # --- demo -----------------------------------------------------------------------------------
    ("demo-size-8", demo("--size", "8"), "--size", {}),
    ("demo-images-9", demo("--images", "9"), "--images", {}),
    ("demo-device-bogus", demo("--device", "bogus"), "bogus", {}),
    ("demo-max-pixels", demo("--size", "64", "--max-pixels", "100"), "--max-pixels", {}),
    ("demo-steps-0", demo("--steps", "0"), "--steps", {}),
    ("demo-steps-method-negative", demo("--steps", "ddrm:-3"), "--steps", {}),
    ("demo-max-memory-tiny", demo("--size", "32", "--max-memory", "1K"), "--max-memory", {}),
]


def _listing(*roots: Path) -> list[str]:
    return sorted(str(p) for r in roots for p in r.rglob("*"))


def _baseline_run(inputs: Path, run: Path) -> None:
    p = _cli([a.replace("{in}", str(inputs)).replace("{out}", str(run)) for a in evaluate()], inputs, plugins="noinception")
    assert p.returncode == 0, p.stderr


def _setup(kind: str | None, inputs: Path, out: Path) -> None:
    if kind == "out_file":
        out.write_text("I am a file\n")
    elif kind == "out_foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
    elif kind == "run_with_bad_record":
        _baseline_run(inputs, out)
        with open(out / "records.jsonl", "a") as f:
            f.write('{"task": "denoise", "method": "baseline", "steps": "zero", "image_id": 3}\n')
            f.write('{"task": "denoise", "method": "baseline", "steps": 0, "image_id": "x.png", "index": 9, "psnr": "high"}\n')
    elif kind == "run_with_bad_config":
        _baseline_run(inputs, out)
        (out / "config.json").write_text('{"settings": ')


def _cli(argv: list[str], inputs: Path, plugins: str | None = None, fault: str | None = None, cwd: Path | None = None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(inputs / "plugins")]), OMP_NUM_THREADS="1")
    env.pop("DIFFRESTORE_PLUGINS", None)
    if plugins:
        env["DIFFRESTORE_PLUGINS"] = f"{plugins}:install"
    if fault == "enospc":
        env["FAULT_DIR"] = str(cwd)
        cmd = [sys.executable, "-c", ENOSPC_RUNNER, *argv]
    else:
        cmd = [sys.executable, "-m", "diffrestore", *argv]
    return subprocess.run(cmd, env=env, cwd=cwd or inputs, capture_output=True, text=True, timeout=900)


def _check(kind: str | None, inputs: Path, out: Path, p) -> None:
    if kind == "not_pwned":
        assert not (inputs / "PWNED").exists(), "loading a prior executed code"
    elif kind in ("steps_20", "size_48", "exif_size"):
        (record,) = [json.loads(f.read_text()) for f in out.glob("*.json")]
        if kind == "steps_20":
            assert record["steps"] == 20  # ddrm's default, the steps the run used
        elif kind == "size_48":
            assert record["size"] == [48, 48] and record["overrides"]["scale"] == 3
        else:  # stored 32 wide and 16 high, shown (orientation 6) 16 wide and 32 high
            assert record["size"] == [32, 16]
    elif kind == "skipped":
        skipped = json.loads((out / "skipped.json").read_text())
        assert [s["file"] for s in skipped] == ["corrupt.png"]
        assert (out / "files.txt").read_text() == "ok32.png\n"
        assert "left out 1 unusable image" in (out / "tables.md").read_text()
    elif kind == "corrected_evaluate":
        argv = [a.replace("{in}", str(inputs)).replace("{out}", str(out)) for a in evaluate("--methods", "ddrm", "--pixel-prior", PRIOR, "--steps", "1")]
        fixed = _cli(argv, inputs, plugins="noinception")
        assert fixed.returncode == 0, fixed.stderr
        assert json.loads((out / "config.json").read_text())["grid"]["steps"] == {"ddrm": 1}
    elif kind == "warned_once":
        lines = p.stderr.strip().splitlines()
        assert [ln for ln in lines if ln.startswith("diffrestore: warning:")] == [
            f"diffrestore: warning: left out 2 malformed record(s) of {out / 'records.jsonl'}"
        ]


@pytest.mark.parametrize("name, argv, expect, opts", ROWS)
def test_bad_input(name, argv, expect, opts, inputs, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    _setup(opts.get("setup"), inputs, out)
    argv = [a.replace("{in}", str(inputs)).replace("{out}", str(out)) for a in argv]
    before = _listing(work, inputs)
    start = time.perf_counter()
    p = _cli(argv, inputs, plugins=opts.get("plugins"), fault=opts.get("fault"), cwd=work)
    seconds = time.perf_counter() - start
    assert "Traceback" not in p.stderr, p.stderr
    if expect is None:
        assert p.returncode == 0, p.stderr
        assert not [ln for ln in p.stderr.splitlines() if ln.startswith("diffrestore: error")]
    else:
        lines = p.stderr.strip().splitlines()
        errors = [ln for ln in lines if ln.startswith("diffrestore: error:")]
        assert p.returncode == 2, p.stderr
        assert len(lines) == 1 and len(errors) == 1, p.stderr
        assert expect in errors[0], errors[0]
        assert _listing(work, inputs) == before, "files left behind"
        if opts.get("fast"):
            assert seconds < FAST_S, f"refused after {seconds:.2f} s"
    _check(opts.get("check"), inputs, out, p)


def test_the_table_is_the_suite_the_issue_asks_for():
    assert len(ROWS) >= 60
    assert len({(r.values[0] if hasattr(r, "values") else r[0]) for r in ROWS}) == len(ROWS)
