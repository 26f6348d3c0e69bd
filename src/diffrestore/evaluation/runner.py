"""The evaluation grid behind ``diffrestore evaluate``: resumable, sharded, order-independent.

One run folder (``--out RUN``) holds everything; ``diffrestore report RUN`` rebuilds every table and
figure from it without running a model.

Files in RUN
------------
``config.json``      ``settings`` (what the numbers depend on: data folder, hash of the chosen
                     files, n, seed, size, prior specs, dtype, device type), ``grid`` (tasks, methods,
                     table steps per method, Figure 7 step sweeps, the figure task) and
                     ``last_invocation`` (device, batch size, ... informational).
``files.txt``        the chosen images, paths relative to the data folder, in index order.
``skipped.json``     with ``--skip-bad``: the chosen images that could not be used (file, reason); they
                     are left out of ``files.txt``. Without it an unusable image stops the command
                     before anything is written (every chosen image is decoded up front).
``records.jsonl``    one JSON object per line and per (method, task, steps, image): ``task, method,
                     steps, image_id, index, psnr, psnr_y, ssim, lpips`` (or ``lpips_note`` when
                     its weights are missing; see ``metrics.full_reference``), ``consistency``
                     (= ||H x_hat - y||), ``seconds`` and, when stored, ``features`` / ``image``
                     (paths relative to RUN). The degraded-input baseline has ``method
                     "baseline"``, ``steps 0``; every grid has it. ``--methods baseline`` alone makes a baseline-only run
                     (no method, no prior, no model loaded); naming methods later extends it.
                     Append-only; each line is written with one ``os.write`` on an ``O_APPEND`` fd
                     and fsynced, so concurrent ranks never interleave. Readers skip a line that
                     does not parse (a writer killed mid-line) and keep the first of duplicates.
``throughput.jsonl`` one line per (method, task, steps): batch size, device, dtype, seconds and
                     samples/s of the method alone on one batch (after one warm-up call).
``features/``        Inception pool features, float32 ``(2048,)`` ``.npy`` per image:
                     ``clean/IDX.npy`` and ``TASK/METHOD-STEPS/IDX.npy`` (written atomically,
                     before the record that names them). ``inception.json`` says whether the
                     network was available and, if not, why (the FID column's n/a text).
``images/``          PNGs: ``clean/IDX.png``, ``TASK/degraded/IDX.png``, ``TASK/METHOD-STEPS/IDX.png``
                     for the first ``FIGURE_IMAGES`` images (Figure 4), for all with --save-images.
``intermediates/``   ``TASK/METHOD-STEPS.npz`` (step, t, x_t, x0 snapshots, float16) of image 0 on
                     the figure task at the table steps, from the methods' ``callback`` (Figure 6).
``tables.md``, ``tables.csv``, ``results.json``, ``fig4_grid.png``, ``fig6_intermediates.png``,
``fig7_fid_throughput.png``, ``fig7.csv``, ``fid_cache.json``  written by
                     :mod:`diffrestore.evaluation.report`.

Randomness and order
--------------------
For each (task, image) the clean image is degraded once with a generator seeded from
``image_seed(seed, image_id + '#measurement')``; every method sees that ``y``. Each restoration
uses ``image_seed(seed, image_id)``. Records are computed one image per call, so a record never
depends on the rank, batch, order or resume point; aggregation sorts records first.

Resume
------
Rerunning the same command computes only the (method, task, steps, image) records that are
missing and the throughput cells that are missing; a finished run loads no model and only
rewrites the tables. Options left out on a rerun are taken from ``config.json``. Changing a
setting (data, n, seed, size, a prior already used, dtype, device type, the table steps of a
method already in the grid, the figure task) is refused. Naming new tasks, methods or Figure 7
steps *extends* the grid: the run's grid is the union of everything ever asked for, and the run
(re)computes whatever of that union is missing.

Sharding
--------
``torchrun --nproc_per_node=K -m diffrestore evaluate ...`` or ``--nproc K`` (K local processes
spawned with torch.multiprocessing): rank r takes images ``i % K == r``; all ranks append to the
one ``records.jsonl``. After a barrier rank 0 measures throughput and writes the report, which
reads the sorted records, so the tables equal a single process's.

Plugin hook (tests, experiments)
--------------------------------
``DIFFRESTORE_PLUGINS="pkg.mod:fn,other.mod"`` imports each module (and calls ``fn()``) in every
evaluation process before anything else, e.g. to register a method in
``diffrestore.methods.METHODS`` or to replace one of the module-level seams below
(``task_names``, ``make_task``, ``load_prior``, ``image_metrics``, ``load_feature_extractor``).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from diffrestore import image_io, resources, runtime
from diffrestore.evaluation.data import check_images, choose_subset, find_images, load_eval_image
from diffrestore.evaluation.distributed import Dist, from_env, launched_by_torchrun, spawn
from diffrestore.methods import check_frozen_graphs, check_options, get_method, preset_options
from diffrestore.restoration import (
    Measurement, image_seed, lcm, measure_image, prior_multiple, resolve_steps, restore_and_score, run_method,
)
from diffrestore.priors.catalog import DEFAULT_PRIORS

FORMAT = 1
PLUGINS_ENV = "DIFFRESTORE_PLUGINS"
BASELINE = "baseline"
#: images (by index) whose clean / degraded / restored PNGs are always kept, for Figure 4
FIGURE_IMAGES = 2
#: x_t snapshots kept per method for Figure 6
FIG6_SNAPSHOTS = 8
ALL_TASKS = ["sr4", "deblur", "denoise", "noisy-sr4"]
DEFAULT_METHODS = ["srldm", "ddrm", "ddrm-srldm"]
DTYPES = ("auto", "fp32", "fp16", "bf16")
PRESETS = {
    # the report's full grid (Tables 1-4, Figures 4, 6, 7); the priors must be given
    "paper": dict(
        n=2000,
        size=256,
        tasks=ALL_TASKS,
        methods=DEFAULT_METHODS,
        steps={"*": 100},
        fig7_steps={"srldm": [5, 10, 20, 50, 100, 200], "ddrm": [10, 20, 50, 100]},
        dtype="fp32",  # the report's numbers in full precision on every device
    ),
    # a small grid that finishes in minutes on a 2-core CPU with the embedded priors
    "quick": dict(
        n=6,
        size=64,
        tasks=ALL_TASKS,
        methods=DEFAULT_METHODS,
        steps={"*": 10},
        fig7_steps={"srldm": [5, 10, 20], "ddrm": [5, 10, 20]},
        pixel_prior=DEFAULT_PRIORS["pixel"],
        latent_prior=DEFAULT_PRIORS["latent"],
    ),
}


class EvalError(ValueError):
    """A problem with the evaluation's input or run folder (one line, exit status 2)."""


class FeaturesUnavailable(Exception):
    """The Inception network cannot be used; the message is the FID column's reason."""


# --------------------------------------------------------------------------------------------
# Seams: where the runner meets the rest of the package (replaceable through the plugin hook)
# --------------------------------------------------------------------------------------------

_LOADED_PLUGINS: set[str] = set()


def load_plugins() -> None:
    """Import the modules named in $DIFFRESTORE_PLUGINS (``module[:function]``, comma-separated)."""
    for item in (s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(",")):
        if not item or item in _LOADED_PLUGINS:
            continue
        name, _, fn = item.partition(":")
        try:
            module = importlib.import_module(name)
            if fn:
                getattr(module, fn)()
        except (ImportError, AttributeError) as e:
            raise EvalError(f"{PLUGINS_ENV}: cannot load {item} ({e})") from None
        _LOADED_PLUGINS.add(item)


def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EvalError(f"{what} ({module}) is not available: {e}") from None


def task_names() -> list[str]:
    tasks = _import("diffrestore.operators.tasks", "the task registry").list_tasks()
    return [t[0] if isinstance(t, (tuple, list)) else str(t) for t in tasks]


def make_task(name: str, size: int):
    """The task ``name`` for (3, size, size) images: ``.operator``, ``.sigma_y``, ``.baseline(y)``."""
    return _import("diffrestore.operators.tasks", "the task registry").make_task(name, (3, size, size))


def load_prior(spec: str, device: str, dtype: str, kind: str, adm_config: dict | None = None, frozen_graphs: bool = False):
    """A ``kind`` ("pixel" / "latent") prior from a spec (path or builtin:NAME); dtype fp32/fp16/bf16;
    ``adm_config``: ADM hyper-parameters an ADM checkpoint does not store (``--adm-config``);
    ``frozen_graphs``: run its network as frozen TorchScript graphs (``--frozen-graphs``)."""
    loading = _import("diffrestore.priors.loading", "prior loading")
    return loading.load_prior(
        spec, device=device, dtype=dtype, kind=kind, adm_config=adm_config, frozen_graphs=frozen_graphs
    )


def image_metrics(x_hat: torch.Tensor, ref: torch.Tensor) -> dict:
    """Full-reference metrics of one image (batch of 1, [-1, 1]): psnr, psnr_y, ssim and lpips, or
    ``lpips_note`` (how to get its weights) when LPIPS cannot be computed."""
    return _import("diffrestore.metrics.quality", "the metrics module").full_reference(x_hat, ref)


def load_feature_extractor(device: str):
    """``extract(images (B, 3, H, W) in [-1, 1]) -> (B, 2048) float32 array`` of Inception features.

    Raises FeaturesUnavailable with the reason (shown in the FID column) when it cannot be built.
    """
    from diffrestore.metrics import inception

    try:
        model = inception.load_inception(device)
    except inception.InceptionUnavailable as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FeaturesUnavailable(msg if msg.lower().startswith("no inception") else f"no Inception weights: {msg}") from None

    def extract(x: torch.Tensor) -> np.ndarray:
        return inception.inception_features(x, extractor=model).astype(np.float32)

    return extract


# --------------------------------------------------------------------------------------------
# What the user asked for
# --------------------------------------------------------------------------------------------


@dataclass
class EvalSpec:
    """An ``evaluate`` command. ``None`` means "not given": taken from the preset, else from the
    run's config.json when resuming, else the default."""

    out: str
    data: str | None = None
    n: int | None = None
    first: bool | None = None  # the first n images (sorted) instead of a seeded random subset
    seed: int | None = None
    size: int | None = None
    tasks: list[str] | None = None
    methods: list[str] | None = None
    steps: dict[str, int] = field(default_factory=dict)  # per method; "*" for every method
    options: dict[str, dict] = field(default_factory=dict)  # per method, e.g. {"ddrm": {"eta": 1.0}}
    fig7_steps: dict[str, list[int]] = field(default_factory=dict)
    fig7_task: str | None = None
    pixel_prior: str | None = None
    latent_prior: str | None = None
    adm_config: dict | None = None  # ADM hyper-parameters for the pixel prior (--adm-config)
    device: str = "cpu"
    dtype: str | None = None
    frozen_graphs: bool | None = None  # None: as the run recorded (default off)
    batch_size: int = 1
    save_images: bool = False
    nproc: int = 1
    progress: bool = True
    preset: str | None = None
    max_pixels: int = resources.DEFAULT_MAX_PIXELS  # larger images are refused (read from the header)
    max_memory: str | None = None  # the memory budget (e.g. "8G"); None: a share of what is available
    skip_bad: bool = False  # leave unusable images out (recorded in skipped.json) instead of refusing
    tile: int | None = None  # None: as the run recorded (default: tile only what does not fit in memory)
    overlap: int | None = None


def parse_list(text: str | None, what: str) -> list[str] | None:
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise EvalError(f"{what} is empty")
    return list(dict.fromkeys(items))


def _positive_int(text: str, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise EvalError(f"{what}: {text!r} is not a whole number") from None
    if v < 1:
        raise EvalError(f"{what}: step counts must be at least 1, got {v}")
    return v


def parse_steps(text: str | None) -> dict[str, int]:
    """``"100"`` (every method), ``"ddrm:20,srldm:100"`` or both (``"50,ddrm:20"``)."""
    out: dict[str, int] = {}
    for item in parse_list(text, "--steps") or []:
        method, sep, value = item.rpartition(":")
        out[method.strip() if sep else "*"] = _positive_int(value.strip(), "--steps")
    return out


def parse_sweep(text: str | None) -> dict[str, list[int]]:
    """``"srldm:5,10,20;ddrm:10,20"`` -> {method: sorted step counts}."""
    out: dict[str, list[int]] = {}
    if text is None:
        return out
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        method, sep, values = part.partition(":")
        if not sep or not method.strip():
            raise EvalError(f"--fig7-steps: {part!r} is not METHOD:S1,S2,...")
        steps = {_positive_int(v.strip(), "--fig7-steps") for v in values.split(",") if v.strip()}
        if not steps:
            raise EvalError(f"--fig7-steps: no step counts for {method.strip()}")
        out[method.strip()] = sorted(set(out.get(method.strip(), [])) | steps)
    return out


def parse_options(text: str | None) -> dict[str, dict]:
    """``"ddrm:eta=1.0;ddrm-ldm:stop=0.4,eta=0"`` -> {method: {option: value}} (validated and typed
    against the method's options)."""
    out: dict[str, dict] = {}
    for part in (p.strip() for p in (text or "").split(";")):
        if not part:
            continue
        method, sep, items = part.partition(":")
        method = method.strip()
        pairs = [item.partition("=") for item in items.split(",") if item.strip()]
        if not sep or not method or not pairs or any(not eq or not k.strip() for k, eq, _ in pairs):
            raise EvalError(f"--options: {part!r} is not METHOD:NAME=VALUE,...")
        get_method(method)
        try:
            out.setdefault(method, {}).update(check_options(method, {k.strip(): v.strip() for k, _, v in pairs}))
        except ValueError as e:
            raise EvalError(f"--options: {e}") from None
    return out


def apply_preset(spec: EvalSpec) -> EvalSpec:
    if spec.preset is None:
        return spec
    if spec.preset not in PRESETS:
        raise EvalError(f"unknown preset {spec.preset!r}; choose from {', '.join(PRESETS)}")
    changes = {}
    for key, value in PRESETS[spec.preset].items():
        if getattr(spec, key) in (None, {}, []):
            changes[key] = value
    if spec.methods and "fig7_steps" in changes:  # sweep only the methods asked for
        changes["fig7_steps"] = {m: v for m, v in changes["fig7_steps"].items() if m in spec.methods}
    return replace(spec, **changes)


# --------------------------------------------------------------------------------------------
# Plan: the validated run (read-only), then the run folder
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    run: Path
    data: Path
    files: list[str]
    config: dict
    fresh: bool  # no config.json yet: this command creates the run
    device: str
    batch_size: int
    save_images: bool
    progress: bool
    skipped: list = field(default_factory=list)  # {"file", "reason"} of chosen images left out (--skip-bad)
    max_pixels: int = resources.DEFAULT_MAX_PIXELS

    @property
    def settings(self) -> dict:
        return self.config["settings"]

    @property
    def grid(self) -> dict:
        return self.config["grid"]


def _norm_prior(spec: str | None) -> str | None:
    if spec is None:
        return None
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def read_config(run: Path) -> dict | None:
    path = run / "config.json"
    if not path.exists():
        return None
    try:
        cfg = json.loads(path.read_text())
        cfg["settings"], cfg["grid"]  # noqa: B018 - shape check
    except (ValueError, KeyError, TypeError):
        raise EvalError(f"{path} is not a readable evaluation config") from None
    return cfg


def prepare(spec: EvalSpec) -> Plan:
    """Validate the command against the data, the registries and an existing run; writes nothing."""
    spec = apply_preset(spec)
    run = Path(spec.out)
    if run.exists() and not run.is_dir():
        raise EvalError(f"--out {run} exists and is not a folder")
    old = read_config(run) if run.is_dir() else None
    if old is None and run.is_dir() and any(run.iterdir()):
        raise EvalError(f"--out {run} is not empty and holds no evaluation run (no config.json); use a new folder")
    o_set = old["settings"] if old else {}
    o_grid = old["grid"] if old else {}

    def pick(given, key, default):
        return given if given is not None else o_set.get(key, default)

    if spec.data is None and not old:
        raise EvalError("--data is required for a new run")
    data = Path(spec.data).expanduser().resolve() if spec.data is not None else Path(o_set["data"])
    device = resources.resolve_device(spec.device)
    dtype = pick(spec.dtype, "dtype", "auto")
    if dtype not in DTYPES:
        raise EvalError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    dtype = runtime.pick_dtype(dtype, device)  # the run records the precision it ran in
    size = int(pick(spec.size, "size", 256))
    if size < 8:
        raise EvalError(f"--size must be at least 8, got {size}")
    seed = int(pick(spec.seed, "seed", 0))
    n = spec.n if spec.n is not None else o_set.get("n")
    if n is not None and n < 1:
        raise EvalError(f"--n must be positive, got {n}")
    if spec.batch_size < 1:
        raise EvalError(f"--batch-size must be positive, got {spec.batch_size}")
    if spec.nproc < 1:
        raise EvalError(f"--nproc must be positive, got {spec.nproc}")

    if spec.max_pixels < 1:
        raise EvalError(f"--max-pixels must be positive, got {spec.max_pixels}")
    first = bool(spec.first if spec.first is not None else o_set.get("first", False))
    chosen = choose_subset(find_images(data), n, seed, first=first)
    files, skipped = _usable_images(data, [p.relative_to(data).as_posix() for p in chosen], spec)

    settings = {
        "data": str(data),
        "files_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(),
        "n_images": len(files),
        "n": n,
        "first": first,
        "seed": seed,
        "size": size,
        "dtype": dtype,
        "device_type": device.type,
        "pixel_prior": _norm_prior(spec.pixel_prior) or o_set.get("pixel_prior"),
        "latent_prior": _norm_prior(spec.latent_prior) or o_set.get("latent_prior"),
    }
    adm_config = spec.adm_config if spec.adm_config is not None else o_set.get("adm_config")
    if adm_config is not None:  # recorded only when given (configs written before the option stay valid)
        settings["adm_config"] = adm_config
    if pick(spec.frozen_graphs, "frozen_graphs", False):  # recorded only when on, like adm_config
        settings["frozen_graphs"] = True
    for key in ("tile", "overlap"):  # recorded only when given, like adm_config
        value = pick(getattr(spec, key), key, None)
        if value is not None:
            settings[key] = value
    diffs = []
    if old:
        o_set.setdefault("first", False)  # runs recorded before --first existed used a random subset
        for key in ("data", "n", "first", "seed", "size", "dtype", "device_type", "pixel_prior", "latent_prior"):
            if o_set.get(key) != settings[key] and not (key.endswith("_prior") and o_set.get(key) is None):
                diffs.append(f"{key.replace('_', ' ')} {o_set.get(key)} -> {settings[key]}")
        if o_set.get("adm_config") != settings.get("adm_config") and o_set.get("pixel_prior") is not None:
            diffs.append(f"adm config {o_set.get('adm_config')} -> {settings.get('adm_config')}")
        if o_set.get("frozen_graphs", False) != settings.get("frozen_graphs", False):
            diffs.append(f"frozen graphs {o_set.get('frozen_graphs', False)} -> {settings.get('frozen_graphs', False)}")
        if not diffs and o_set.get("files_sha256") != settings["files_sha256"]:
            diffs.append("the chosen images differ (the data folder's contents changed)")

    # grid: the union of the stored one and this command's
    known_tasks = task_names()
    tasks = list(o_grid.get("tasks", []))
    for t in spec.tasks or ([] if old else ALL_TASKS):
        if t not in known_tasks:
            raise EvalError(f"unknown task {t!r}; choose from {', '.join(known_tasks)}")
        if t not in tasks:
            tasks.append(t)
    methods = list(o_grid.get("methods", []))
    if spec.methods:  # "baseline" names the Baseline row, which every grid has: --methods baseline = only it
        asked = [m for m in spec.methods if m != BASELINE]
    else:
        asked = [] if old else DEFAULT_METHODS
    for m in asked:
        get_method(m)
        if m not in methods:
            methods.append(m)
    try:
        check_frozen_graphs(methods + list(spec.fig7_steps), settings.get("frozen_graphs", False))
    except ValueError as e:
        raise EvalError(str(e)) from None
    for m in spec.steps:
        if m != "*" and m not in methods:
            raise EvalError(f"--steps names {m!r}, which is not among the methods ({', '.join(methods)})")
    steps = {}
    for m in methods:
        given = spec.steps.get(m, spec.steps.get("*"))
        before = o_grid.get("steps", {}).get(m)
        if given is not None and before is not None and given != before:
            diffs.append(f"steps of {m} {before} -> {given}")
        steps[m] = int(given or before or get_method(m).default_steps)
    sweep = {m: list(v) for m, v in o_grid.get("fig7_steps", {}).items()}
    for m, values in spec.fig7_steps.items():
        get_method(m)
        sweep[m] = sorted(set(sweep.get(m, [])) | set(values))
    ran = set(o_grid.get("methods", [])) | set(o_grid.get("fig7_steps", {}))
    options = _grid_options(spec, o_grid.get("options", {}), methods, sweep, ran, diffs)
    figure_task = spec.fig7_task or o_grid.get("figure_task") or ("sr4" if "sr4" in tasks else tasks[0])
    if o_grid.get("figure_task") and figure_task != o_grid["figure_task"]:
        diffs.append(f"figure task {o_grid['figure_task']} -> {figure_task}")
    if figure_task not in tasks:
        raise EvalError(f"--fig7-task {figure_task!r} is not among the tasks ({', '.join(tasks)})")
    if diffs:
        raise EvalError(f"{run} was made with different settings: {'; '.join(diffs)}; use a new --out")

    for m in list(dict.fromkeys(methods + list(sweep))):
        kind = get_method(m).prior
        if not settings[f"{kind}_prior"]:
            raise EvalError(f"method {m} needs a {kind} prior: pass --{kind}-prior SPEC")

    if n is not None and n > len(files) and spec.n is not None and os.environ.get("RANK", "0") == "0":
        print(f"diffrestore: only {len(files)} images under {data}; evaluating all of them", file=sys.stderr)
    config = {
        "format": FORMAT,
        "settings": settings,
        "grid": {"tasks": tasks, "methods": methods, "steps": steps, "fig7_steps": sweep, "figure_task": figure_task}
        | ({"options": options} if options else {}),
        "last_invocation": {
            "device": str(device),
            "batch_size": spec.batch_size,
            "save_images": spec.save_images,
            "nproc": spec.nproc,
        },
    }
    _check_memory(config, spec)
    return Plan(run, data, files, config, old is None, str(device), spec.batch_size, spec.save_images, spec.progress, skipped, spec.max_pixels)


def _grid_options(spec: EvalSpec, recorded: dict, methods: list[str], sweep: dict, ran: set[str],
                  diffs: list[str]) -> dict[str, dict]:
    """Each method's options as the run records and passes them: those of ``--options``, and every
    option whose recommended default differs from the paper's, pinned to the value the run uses
    (the paper's with ``--preset paper``), so the grid never depends on which defaults apply. A run
    recorded without such an option ran the paper's value. The options of a method the resumed run
    already has (``ran``) must not change (appended to ``diffs``)."""
    for m in spec.options:
        if m not in methods:
            raise EvalError(f"--options names {m!r}, which is not among the methods ({', '.join(methods)})")
    options = {}
    for m in dict.fromkeys(methods + list(sweep)):
        before = dict(recorded.get(m, {}))
        resuming = m in ran
        if resuming:
            pinned = {**preset_options(m, "paper"), **{k: v for k, v in before.items() if k in get_method(m).recommended}}
        else:
            pinned = preset_options(m, "paper" if spec.preset == "paper" else None)
        given = spec.options.get(m)
        if resuming and given is not None and {**pinned, **given} != {**pinned, **before}:
            diffs.append(f"options of {m} {before} -> {given}")
        chosen = {**pinned, **(before if given is None else given)}
        if chosen:
            options[m] = chosen
    return options


def _usable_images(data: Path, files: list[str], spec: EvalSpec) -> tuple[list[str], list[dict]]:
    """The chosen files every one of which decodes (and fits ``--max-pixels``), and those left out: with
    ``--skip-bad`` unusable files are skipped, else the first one is refused with a count of the others."""
    bad = check_images(data, files, spec.max_pixels)
    if bad and not spec.skip_bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise EvalError(f"{data / bad[0]['file']}: {bad[0]['reason']}{more}; fix or remove it, or pass --skip-bad to leave such images out")
    names = {b["file"] for b in bad}
    kept = [f for f in files if f not in names]
    if not kept:
        raise EvalError(f"none of the {len(files)} chosen images under {data} can be used (e.g. {bad[0]['file']}: {bad[0]['reason']})")
    return kept, bad


def _check_memory(config: dict, spec: EvalSpec) -> None:
    """Refuse a grid whose largest cell (image size, samples, throughput batch) would not fit the memory
    budget (``--max-memory``, else a share of what the device has free)."""
    from diffrestore.operators.tasks import TASKS

    settings, grid = config["settings"], config["grid"]
    budget = resources.memory_budget(spec.max_memory, config["last_invocation"]["device"])
    size = settings["size"]
    separable = any(getattr(TASKS.get(t), "separable", False) for t in grid["tasks"])
    for m in [BASELINE, *dict.fromkeys(grid["methods"] + list(grid["fig7_steps"]))]:
        samples = int(grid.get("options", {}).get(m, {}).get("samples", 1))
        kind = "none" if m == BASELINE else get_method(m).prior
        resources.check_memory(size, size, budget, samples=samples, batch=spec.batch_size, kind=kind,
                               separable=separable, what=f"{m} on {size}x{size} images, batch {spec.batch_size},")


class RunLock:
    """An exclusive flock on RUN/.lock, held by the process that owns the run while it is written."""

    def __init__(self, run: Path):
        self.fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise EvalError(f"{run} is being written by another `diffrestore evaluate`") from None

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def open_run(plan: Plan) -> tuple[RunLock, bool]:
    """Create / claim the run folder and write config.json and files.txt. Returns (lock, created)."""
    run = plan.run
    created = image_io.prepare_output_dir(run)
    lock = RunLock(run)
    try:
        if plan.fresh:
            image_io.atomic_write_text(run / "files.txt", "".join(f + "\n" for f in plan.files))
        if plan.skipped:
            image_io.atomic_write_json(run / "skipped.json", plan.skipped)
        image_io.atomic_write_json(run / "config.json", plan.config)
        for name in ("records.jsonl", "throughput.jsonl"):
            repair_tail(run / name)
    except BaseException:
        lock.release()
        if created:  # nothing of a run was written yet
            shutil.rmtree(run, ignore_errors=True)
        raise
    return lock, created


def discard_if_empty(plan: Plan, created: bool) -> None:
    """After a failure: remove what a *new* run wrote, as long as no record was written."""
    if not plan.fresh or (plan.run / "records.jsonl").exists():
        return
    if created:
        shutil.rmtree(plan.run, ignore_errors=True)
    else:  # the folder was empty before (prepare refuses anything else)
        for p in plan.run.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Records: append-only JSON lines
# --------------------------------------------------------------------------------------------


def append_line(path: Path, obj: dict) -> None:
    """Append one JSON line with a single write on an O_APPEND descriptor, then fsync."""
    data = (json.dumps(obj, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path} ({written} of {len(data)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_tail(path: Path) -> None:
    """End a line cut by a killed writer, so the next append starts on a line of its own."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
        if last != b"\n":
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """Every complete JSON object line of ``path`` (lines that do not parse are skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def record_key(r: dict) -> tuple:
    return (r["task"], r["method"], int(r["steps"]), r["image_id"])


#: fields of a record and their types; a line that parses but breaks these is left out with a warning
RECORD_FIELDS = {"task": str, "method": str, "steps": int, "image_id": str, "index": int}
RECORD_NUMBERS = ("psnr", "ssim", "lpips", "consistency", "seconds", "sample_std", "std_error_correlation")


def well_formed(r: dict) -> bool:
    """Whether a parsed record has every key field with its type and numbers where numbers belong."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    return (
        all(isinstance(r.get(k), t) and not isinstance(r.get(k), bool) for k, t in RECORD_FIELDS.items())
        and all(number(r[k]) for k in RECORD_NUMBERS if k in r)
        and all(isinstance(r[k], str) for k in ("features", "image") if k in r)
    )


def read_records(run: Path, warn: bool = False) -> list[dict]:
    """The run's records, first of any duplicates, sorted by (task, method, steps, index). Lines that parse
    but are not records (a field missing or of the wrong type) are left out, with one warning line on
    stderr when ``warn``; lines that do not parse (a writer killed mid-line) are left out silently."""
    seen: dict[tuple, dict] = {}
    bad = 0
    for r in read_jsonl(Path(run) / "records.jsonl"):
        if not well_formed(r):
            bad += 1
            continue
        seen.setdefault(record_key(r), r)
    if bad and warn:
        print(f"diffrestore: warning: left out {bad} malformed record(s) of {Path(run) / 'records.jsonl'}", file=sys.stderr)
    return sorted(seen.values(), key=lambda r: (r["task"], r["method"], r["steps"], r["index"]))


def table_cells(grid: dict) -> list[tuple[str, str, int]]:
    """(task, method, steps) of the tables, baseline first, in grid order."""
    return [(t, m, s) for t in grid["tasks"] for m, s in [(BASELINE, 0)] + [(m, grid["steps"][m]) for m in grid["methods"]]]


def sweep_cells(grid: dict) -> list[tuple[str, str, int]]:
    return [(grid["figure_task"], m, s) for m, steps in grid["fig7_steps"].items() for s in steps]


def all_cells(grid: dict) -> list[tuple[str, str, int]]:
    return list(dict.fromkeys(table_cells(grid) + sweep_cells(grid)))


def cell_dir(task: str, method: str, steps: int) -> str:
    return f"{task}/{method}-{steps}"


def image_name(index: int, n_images: int) -> str:
    """File stem of image ``index`` under images/, features/ (zero-padded, sorts in index order)."""
    return f"{index:0{max(5, len(str(n_images - 1)))}d}"


# --------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------


def _save_array(path: Path, **arrays) -> None:
    """Atomically write one array (.npy, key ``a``) or several (.npz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with image_io.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            if path.suffix == ".npz":
                np.savez(f, **arrays)
            else:
                np.save(f, arrays["a"])
            f.flush()
            os.fsync(f.fileno())


def _save_png(path: Path, x: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_io.write_image(path, x)


class _Resources:
    """Models and tasks of one process, loaded when first needed (a finished run loads nothing)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.priors: dict = {}
        self.tasks: dict = {}
        self.extractor = None
        self.features_reason: str | None = None
        self._features_tried = False

    def task(self, name: str):
        if name not in self.tasks:
            self.tasks[name] = make_task(name, self.plan.settings["size"])
        return self.tasks[name]

    def priors_for(self, method: str, task: str) -> dict:
        kind = get_method(method).prior
        if kind not in self.priors:
            spec = self.plan.settings[f"{kind}_prior"]
            adm = self.plan.settings.get("adm_config") if kind == "pixel" else None
            args = (spec, self.plan.device, self.plan.settings["dtype"], kind)
            extra = {"adm_config": adm} if adm else {}  # plugins' load_prior may take neither
            if self.plan.settings.get("frozen_graphs"):
                extra["frozen_graphs"] = True
            prior = load_prior(*args, **extra)
            got = "latent" if hasattr(prior, "encode") else "pixel"
            if got != kind:
                raise EvalError(f"--{kind}-prior {spec} is a {got} prior")
            self.priors[kind] = prior
        op = self.task(task).operator
        size = self.plan.settings["size"]
        multiple = lcm(max(1, size // op.measurement_shape[-1]), prior_multiple(self.priors[kind]))
        if size % multiple:
            raise EvalError(f"--size {size} does not suit {method} on {task}: image sides must be multiples of {multiple}")
        return self.priors

    def features(self):
        if not self._features_tried:
            self._features_tried = True
            try:
                self.extractor = load_feature_extractor(self.plan.device)
            except FeaturesUnavailable as e:
                self.features_reason = str(e)
            image_io.atomic_write_json(
                self.plan.run / "inception.json", {"available": self.extractor is not None, "reason": self.features_reason}
            )
        return self.extractor

    def measure(self, task_name: str, x: torch.Tensor, image_id: str) -> torch.Tensor:
        """y of one clean CPU image (1, C, H, W), drawn on the CPU, on the run device: the same for every
        method, rank and resume point."""
        return measure_image(self.task(task_name), x, self.plan.settings["seed"], image_id).to(self.plan.device)


def _snapshot(info) -> tuple[int, float, torch.Tensor, torch.Tensor]:
    """(step, t, x_t, x0) of image 0 from a method's ``StepInfo`` (see ``methods.common``)."""
    t = float(torch.as_tensor(info["t"]).reshape(-1)[0])
    return int(info["i"]), t, info["x_t"][0].detach().float().cpu().half(), info["x0"][0].detach().float().cpu().half()


def _bars(plan: Plan, dist: Dist, todo: list[tuple[int, str, list]]):
    from tqdm import tqdm

    enabled = plan.progress and dist.is_main
    per_method: dict[str, int] = {}
    for _, _, cells in todo:
        for m, _s in cells:
            per_method[m] = per_method.get(m, 0) + 1
    suffix = f" (rank 0 of {dist.world})" if dist.world > 1 else ""
    total = tqdm(total=sum(per_method.values()), desc="grid" + suffix, unit="rec", disable=not enabled, position=0)
    bars = {
        m: tqdm(total=k, desc=f"  {m}", unit="img", disable=not enabled, position=i + 1, leave=False)
        for i, (m, k) in enumerate(per_method.items())
    }
    return total, bars


def missing_work(plan: Plan, dist: Dist) -> list[tuple[int, str, list[tuple[str, int]]]]:
    """(image index, task, missing (method, steps) cells) of this rank's records still to compute."""
    grid, files = plan.grid, plan.files
    done = {record_key(r) for r in read_records(plan.run)}
    cells: dict[str, list[tuple[str, int]]] = {}
    for t, m, s in all_cells(grid):
        cells.setdefault(t, []).append((m, s))
    todo = []
    for i in range(dist.rank, len(files), dist.world):
        for t in grid["tasks"]:
            missing = [(m, s) for m, s in cells[t] if (t, m, s, files[i]) not in done]
            if missing:
                todo.append((i, t, missing))
    return todo


def preflight(plan: Plan, todo: list, res: _Resources) -> None:
    """Fail before any model call (and, called from ``evaluate``, before the run folder is written) when a
    task, prior, image size or step count of the missing work cannot run: loads the priors it needs."""
    for t in plan.grid["tasks"]:
        res.task(t)
    for _, t, missing in todo:
        for m, steps in missing:
            if m != BASELINE:
                priors = res.priors_for(m, t)
                try:
                    resolve_steps(m, steps, priors[get_method(m).prior])
                except ValueError as e:
                    raise EvalError(f"--steps: {e}") from None


def run_records(plan: Plan, dist: Dist, res: _Resources) -> int:
    """Compute this rank's missing records. Returns how many were written."""
    run, settings, grid, files = plan.run, plan.settings, plan.grid, plan.files
    todo = missing_work(plan, dist)
    if not todo:
        return 0
    preflight(plan, todo, res)  # done before the run folder was written; cached, so free here
    probe = image_metrics(torch.zeros(1, 3, settings["size"], settings["size"]), torch.full((1, 3, settings["size"], settings["size"]), 0.5))
    if "lpips_note" in probe and dist.is_main:
        print(f"diffrestore: LPIPS left out: {probe['lpips_note']}", file=sys.stderr)
    extract = res.features()

    seed, size = settings["seed"], settings["size"]
    total_bar, method_bars = _bars(plan, dist, todo)
    written = 0
    current = (None, None, None)  # (index, clean image on the CPU, on the device)
    try:
        for i, task_name, missing in todo:
            image_id, name = files[i], image_name(i, len(files))
            keep = plan.save_images or i < FIGURE_IMAGES
            if current[0] != i:
                x = load_eval_image(plan.data / image_id, size, plan.max_pixels).unsqueeze(0)
                current = (i, x, x.to(plan.device))
                clean_feat = run / "features" / "clean" / f"{name}.npy"
                if extract is not None and not clean_feat.exists():
                    _save_array(clean_feat, a=extract(current[2])[0])
                if keep and not (run / "images" / "clean" / f"{name}.png").exists():
                    _save_png(run / "images" / "clean" / f"{name}.png", x)
            _, x, xd = current
            task = res.task(task_name)
            y = res.measure(task_name, x, image_id)
            if keep and not (run / "images" / task_name / "degraded" / f"{name}.png").exists():
                _save_png(run / "images" / task_name / "degraded" / f"{name}.png", task.operator.to_image(y))
            for method, steps in missing:
                snaps: list = []
                callback = None
                if i == 0 and task_name == grid["figure_task"] and method != BASELINE and steps == grid["steps"].get(method):

                    def callback(info, _snaps=snaps):
                        _snaps.append(_snapshot(info))

                prior = None if method == BASELINE else res.priors_for(method, task_name)[get_method(method).prior]
                r = restore_and_score(
                    Measurement(xd, y, task, None), method=method, prior=prior, steps=steps, seed=seed, image_id=image_id,
                    options=grid.get("options", {}).get(method, {}), callback=callback, tile=settings.get("tile"),
                    overlap=settings.get("overlap"),
                )  # fmt: skip
                x_hat = r.x_hat
                record = {"task": task_name, "method": method, "steps": steps, "image_id": image_id, "index": i, **r.metrics}
                if r.spread is not None:  # samples > 1: how far the draws spread, and where
                    record.update(sample_std=r.spread["mean"], std_error_correlation=r.spread["error_correlation"])
                record.update(consistency=r.consistency, seconds=r.seconds)
                where = cell_dir(task_name, method, steps)
                if extract is not None:
                    _save_array(run / "features" / where / f"{name}.npy", a=extract(x_hat)[0])
                    record["features"] = f"features/{where}/{name}.npy"
                if keep:
                    _save_png(run / "images" / where / f"{name}.png", x_hat)
                    record["image"] = f"images/{where}/{name}.png"
                if snaps:
                    pick = sorted({round(j) for j in np.linspace(0, len(snaps) - 1, min(len(snaps), FIG6_SNAPSHOTS))})
                    chosen = [snaps[j] for j in pick]
                    _save_array(
                        run / "intermediates" / f"{where}.npz",
                        step=np.array([c[0] for c in chosen]),
                        t=np.array([c[1] for c in chosen]),
                        x_t=torch.stack([c[2] for c in chosen]).numpy(),
                        x0=torch.stack([c[3] for c in chosen]).numpy(),
                    )
                append_line(run / "records.jsonl", record)
                written += 1
                total_bar.update(1)
                method_bars[method].update(1)
    finally:
        for b in method_bars.values():
            b.close()
        total_bar.close()
    return written


def measure_throughput(plan: Plan, res: _Resources) -> int:
    """Samples/s of each (task, method, steps) cell: one warm-up call, then one timed batch."""
    from tqdm import tqdm

    settings, grid, run = plan.settings, plan.grid, plan.run
    have = {
        (r.get("task"), r.get("method"), r.get("steps"), r.get("batch_size"), r.get("device"))
        for r in read_jsonl(run / "throughput.jsonl")
    }
    cells = [c for c in all_cells(grid) if c[1] != BASELINE and (*c, plan.batch_size, plan.device) not in have]
    if not cells:
        return 0
    batch = [plan.files[j % len(plan.files)] for j in range(plan.batch_size)]
    ys: dict[str, torch.Tensor] = {}
    bar = tqdm(cells, desc="throughput", unit="cell", disable=not plan.progress)
    for task_name, method, steps in bar:
        priors = res.priors_for(method, task_name)
        if task_name not in ys:
            clean = [load_eval_image(plan.data / f, settings["size"], plan.max_pixels).unsqueeze(0) for f in batch]
            ys[task_name] = torch.cat([res.measure(task_name, x, f) for x, f in zip(clean, batch)])
        seed = image_seed(settings["seed"], "#throughput")
        task = res.task(task_name)
        options = {**grid.get("options", {}).get(method, {}), "tile": settings.get("tile"), "overlap": settings.get("overlap")}
        run_method(method, priors, task, ys[task_name], steps=min(steps, 2), seed=seed, **options)  # warm-up
        seconds = run_method(method, priors, task, ys[task_name], steps=steps, seed=seed, **options).seconds
        append_line(
            run / "throughput.jsonl",
            {
                "task": task_name,
                "method": method,
                "steps": steps,
                "batch_size": plan.batch_size,
                "device": plan.device,
                "dtype": settings["dtype"],
                "frozen_graphs": settings.get("frozen_graphs", False),
                "seconds": seconds,
                "samples_per_s": plan.batch_size / seconds if seconds > 0 else float("inf"),
            },
        )
    return len(cells)


def execute(plan: Plan, dist: Dist, res: _Resources | None = None) -> None:
    """Every rank: its records; then rank 0: throughput and the report. ``res``: the models and tasks
    :func:`preflight` already loaded, if any."""
    from diffrestore.evaluation import report

    res = res or _Resources(plan)
    err = None
    try:
        run_records(plan, dist, res)
    except Exception as e:  # every rank must reach agree(), or the others would wait forever
        err = e
    dist.agree(err)
    if dist.is_main:
        measure_throughput(plan, res)
        report.write_report(plan.run)


def _rank_device(plan: Plan, dist: Dist) -> Plan:
    """One GPU per local rank when there are several."""
    if plan.device.startswith("cuda") and torch.cuda.device_count() > 1:
        return replace(plan, device=f"cuda:{dist.local_rank % torch.cuda.device_count()}")
    return plan


def _worker(dist: Dist, plan: Plan) -> None:
    """Entry of a process spawned by --nproc."""
    load_plugins()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world))
    execute(_rank_device(plan, dist), dist)


def evaluate(spec: EvalSpec) -> Path:
    """Run (or resume, or extend) an evaluation; returns the run folder."""
    load_plugins()
    if launched_by_torchrun():
        if spec.nproc > 1:
            raise EvalError("--nproc cannot be combined with torchrun (torchrun already starts the processes)")
        dist = from_env()
        try:
            _evaluate_in_group(spec, dist)
        finally:
            dist.close()
        return Path(spec.out)
    plan = prepare(spec)
    res = _Resources(plan)
    preflight(plan, [w for r in range(spec.nproc) for w in missing_work(plan, Dist(r, spec.nproc))], res)
    lock, created = open_run(plan)
    try:
        if spec.nproc > 1:
            del res  # each worker loads its own models
            spawn(_worker, spec.nproc, plan)
        else:
            execute(plan, Dist(), res)
    except BaseException:
        discard_if_empty(plan, created)
        raise
    finally:
        lock.release()
    return plan.run


def _evaluate_in_group(spec: EvalSpec, dist: Dist) -> None:
    plan = err = res = None
    try:
        plan = _rank_device(prepare(spec), dist)
        res = _Resources(plan)
        preflight(plan, missing_work(plan, dist), res)
    except Exception as e:
        err = e
    dist.agree(err)
    lock, created = None, False
    if dist.is_main:
        try:
            lock, created = open_run(plan)
        except Exception as e:
            err = e
    dist.agree(err)
    try:
        execute(plan, dist, res)
    except BaseException:
        if dist.is_main:
            discard_if_empty(plan, created)
        raise
    finally:
        if lock is not None:
            lock.release()
