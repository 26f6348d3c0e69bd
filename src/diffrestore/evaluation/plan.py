"""What an ``evaluate`` command asks for (:class:`EvalSpec`) and the validated run it becomes (:class:`Plan`).

:func:`prepare` checks the command against the data, the registries and an existing run, and writes
nothing. Options left out on a rerun are taken from the run's ``config.json``; changing a setting the
numbers depend on (data, n, seed, size, a prior already used, dtype, device type, the table steps or
options of a method already in the grid, the figure task) is refused. Naming new tasks, methods or
Figure 7 steps extends the grid: the run's grid is the union of everything ever asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from diffrestore import resources, runtime
from diffrestore.errors import EvalError
from diffrestore.evaluation.data import check_images, choose_subset, find_images
from diffrestore.methods import check_frozen_graphs, get_method, preset_options
from diffrestore.operators.tasks import BASELINE, TASKS, task_names
from diffrestore.priors.catalog import DEFAULT_PRIORS

FORMAT = 1
ALL_TASKS = ["sr4", "deblur", "denoise", "noisy-sr4"]
DEFAULT_METHODS = ["srldm", "ddrm", "ddrm-srldm"]
DTYPES = ("auto", "fp32", "fp16", "bf16")
PRESETS = {
    # the report's full grid (Tables 1-4, Figures 4, 6, 7); the priors must be given
    "paper": dict(
        n=2000, size=256, tasks=ALL_TASKS, methods=DEFAULT_METHODS, steps={"*": 100},
        fig7_steps={"srldm": [5, 10, 20, 50, 100, 200], "ddrm": [10, 20, 50, 100]},
        dtype="fp32",  # the report's numbers in full precision on every device
    ),
    # a small grid that finishes in minutes on a CPU with the built-in priors
    "quick": dict(
        n=6, size=64, tasks=ALL_TASKS, methods=DEFAULT_METHODS, steps={"*": 10},
        fig7_steps={"srldm": [5, 10, 20], "ddrm": [5, 10, 20]},
        pixel_prior=DEFAULT_PRIORS["pixel"], latent_prior=DEFAULT_PRIORS["latent"],
    ),
}  # fmt: skip


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


def apply_preset(spec: EvalSpec) -> EvalSpec:
    """``spec`` with what it leaves out taken from its preset (unchanged without one)."""
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


@dataclass
class Plan:
    """A validated ``evaluate`` command: the run's config (settings and grid) and this invocation's choices."""

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


def read_config(run: Path) -> dict | None:
    """RUN/config.json (None when there is none); EvalError when it is not an evaluation config."""
    path = run / "config.json"
    if not path.exists():
        return None
    try:
        cfg = json.loads(path.read_text())
        cfg["settings"], cfg["grid"]  # noqa: B018 - shape check
    except (ValueError, KeyError, TypeError):
        raise EvalError(f"{path} is not a readable evaluation config") from None
    return cfg


def _norm_prior(spec: str | None) -> str | None:
    if spec is None:
        return None
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def _existing_run(run: Path) -> dict | None:
    """The config of the run in ``--out`` (None for a new run); refuses a file or a foreign folder."""
    if run.exists() and not run.is_dir():
        raise EvalError(f"--out {run} exists and is not a folder")
    old = read_config(run) if run.is_dir() else None
    if old is None and run.is_dir() and any(run.iterdir()):
        raise EvalError(f"--out {run} is not empty and holds no evaluation run (no config.json); use a new folder")
    return old


def _check_counts(spec: EvalSpec, size: int, n: int | None) -> None:
    if size < 8:
        raise EvalError(f"--size must be at least 8, got {size}")
    if n is not None and n < 1:
        raise EvalError(f"--n must be positive, got {n}")
    if spec.batch_size < 1:
        raise EvalError(f"--batch-size must be positive, got {spec.batch_size}")
    if spec.nproc < 1:
        raise EvalError(f"--nproc must be positive, got {spec.nproc}")
    if spec.max_pixels < 1:
        raise EvalError(f"--max-pixels must be positive, got {spec.max_pixels}")


def _settings(spec: EvalSpec, o_set: dict, has_old: bool):
    """(settings, chosen files, skipped files, device) of this command: given values, else the run's, else
    the defaults."""

    def pick(given, key, default):
        return given if given is not None else o_set.get(key, default)

    if spec.data is None and not has_old:
        raise EvalError("--data is required for a new run")
    data = Path(spec.data).expanduser().resolve() if spec.data is not None else Path(o_set["data"])
    device = resources.resolve_device(spec.device)
    dtype = pick(spec.dtype, "dtype", "auto")
    if dtype not in DTYPES:
        raise EvalError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    dtype = runtime.pick_dtype(dtype, device)  # the run records the precision it ran in
    size = int(pick(spec.size, "size", 256))
    seed = int(pick(spec.seed, "seed", 0))
    n = spec.n if spec.n is not None else o_set.get("n")
    _check_counts(spec, size, n)
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
    return settings, files, skipped, device


def _settings_diffs(o_set: dict, settings: dict) -> list[str]:
    """How this command's settings differ from those the run was made with."""
    diffs = []
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
    return diffs


def _grid_names(spec: EvalSpec, o_grid: dict, has_old: bool, settings: dict) -> tuple[list[str], list[str]]:
    """(tasks, methods) of the grid: the stored ones, then those this command adds."""
    known_tasks = task_names()
    tasks = list(o_grid.get("tasks", []))
    for t in spec.tasks or ([] if has_old else ALL_TASKS):
        if t not in known_tasks:
            raise EvalError(f"unknown task {t!r}; choose from {', '.join(known_tasks)}")
        if t not in tasks:
            tasks.append(t)
    methods = list(o_grid.get("methods", []))
    if spec.methods:  # "baseline" names the Baseline row, which every grid has: --methods baseline = only it
        asked = [m for m in spec.methods if m != BASELINE]
    else:
        asked = [] if has_old else DEFAULT_METHODS
    for m in asked:
        get_method(m)
        if m not in methods:
            methods.append(m)
    try:
        check_frozen_graphs(methods + list(spec.fig7_steps), settings.get("frozen_graphs", False))
    except ValueError as e:
        raise EvalError(str(e)) from None
    return tasks, methods


def _grid_steps(spec: EvalSpec, o_grid: dict, methods: list[str], diffs: list[str]) -> tuple[dict, dict]:
    """(table steps per method, Figure 7 sweeps per method); a changed table step count goes to ``diffs``."""
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
    return steps, sweep


def _grid(spec: EvalSpec, o_grid: dict, has_old: bool, settings: dict, diffs: list[str]) -> dict:
    """The run's grid: the union of the stored one and this command's."""
    tasks, methods = _grid_names(spec, o_grid, has_old, settings)
    steps, sweep = _grid_steps(spec, o_grid, methods, diffs)
    ran = set(o_grid.get("methods", [])) | set(o_grid.get("fig7_steps", {}))
    options = _grid_options(spec, o_grid.get("options", {}), methods, sweep, ran, diffs)
    figure_task = spec.fig7_task or o_grid.get("figure_task") or ("sr4" if "sr4" in tasks else tasks[0])
    if o_grid.get("figure_task") and figure_task != o_grid["figure_task"]:
        diffs.append(f"figure task {o_grid['figure_task']} -> {figure_task}")
    if figure_task not in tasks:
        raise EvalError(f"--fig7-task {figure_task!r} is not among the tasks ({', '.join(tasks)})")
    grid = {"tasks": tasks, "methods": methods, "steps": steps, "fig7_steps": sweep, "figure_task": figure_task}
    return grid | ({"options": options} if options else {})


def prepare(spec: EvalSpec) -> Plan:
    """Validate the command against the data, the registries and an existing run; writes nothing."""
    spec = apply_preset(spec)
    run = Path(spec.out)
    old = _existing_run(run)
    o_set = old["settings"] if old else {}
    o_grid = old["grid"] if old else {}
    settings, files, skipped, device = _settings(spec, o_set, bool(old))
    diffs = _settings_diffs(o_set, settings) if old else []
    grid = _grid(spec, o_grid, bool(old), settings, diffs)
    if diffs:
        raise EvalError(f"{run} was made with different settings: {'; '.join(diffs)}; use a new --out")
    for m in list(dict.fromkeys(grid["methods"] + list(grid["fig7_steps"]))):
        kind = get_method(m).prior
        if not settings[f"{kind}_prior"]:
            raise EvalError(f"method {m} needs a {kind} prior: pass --{kind}-prior SPEC")
    n = settings["n"]
    if n is not None and n > len(files) and spec.n is not None and os.environ.get("RANK", "0") == "0":
        print(f"diffrestore: only {len(files)} images under {settings['data']}; evaluating all of them", file=sys.stderr)
    config = {
        "format": FORMAT,
        "settings": settings,
        "grid": grid,
        "last_invocation": {
            "device": str(device),
            "batch_size": spec.batch_size,
            "save_images": spec.save_images,
            "nproc": spec.nproc,
        },
    }
    _check_memory(config, spec)
    data = Path(settings["data"])
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
    settings, grid = config["settings"], config["grid"]
    budget = resources.memory_budget(spec.max_memory, config["last_invocation"]["device"])
    size = settings["size"]
    separable = any(getattr(TASKS.get(t), "separable", False) for t in grid["tasks"])
    for m in [BASELINE, *dict.fromkeys(grid["methods"] + list(grid["fig7_steps"]))]:
        samples = int(grid.get("options", {}).get(m, {}).get("samples", 1))
        kind = "none" if m == BASELINE else get_method(m).prior
        resources.check_memory(size, size, budget, samples=samples, batch=spec.batch_size, kind=kind,
                               separable=separable, what=f"{m} on {size}x{size} images, batch {spec.batch_size},")
