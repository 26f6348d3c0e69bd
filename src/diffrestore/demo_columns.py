"""What ``diffrestore demo`` shows and how its columns are labelled.

Two sets of columns (a method with its steps and the options passed to it):

* ``USER_COLUMNS``, the default: the methods a user should pick (DDRM, DiffPIR, DDRM-LDM, and SRLDM
  with its final consistency step), at step counts that keep the whole demo within minutes on a CPU;
* ``REPORT_COLUMNS`` (``demo --report``): the report's comparison, with the report's options pinned
  here so that a change of the registry's defaults does not change what it reproduces. It keeps the
  two setups the report found to fail, SRLDM sampled from noise without a consistency step (nothing
  ties its colours to the measurement) and the DDRM-SRLDM hybrid (the latent model gives DDRM no
  pixel noise estimate), and their titles say so.

A column's title is its method's name, tags (``report``, ``fails: ...``), the steps and the options
that matter: the method's key options (``KEY_OPTIONS``) and any option set away from the registry's
default. What "fails" is decided from the options actually used (``failure``), not from the set.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Mapping

from diffrestore.methods import METHODS, check_options, get_method, method_options
from diffrestore.operators.tasks import get_task_spec
from diffrestore.restoration import used_options


@dataclass(frozen=True)
class Column:
    method: str
    steps: int
    options: Mapping[str, object] = field(default_factory=dict)  # passed to the method explicitly
    report: bool = False  # one of the report's setups


USER_COLUMNS = (
    Column("ddrm", 20),
    Column("diffpir", 20),
    Column("ddrm-ldm", 50),
    Column("srldm", 50, {"consistency": True}),
)
REPORT_COLUMNS = (
    Column("srldm", 50, {"eta": 1.0, "start": 1.0, "consistency": False}, report=True),
    Column("ddrm", 20, {"eta": 0.85, "eta_b": 1.0}, report=True),
    Column("ddrm-srldm", 20, {"strategy": "a", "eta": 0.85, "eta_b": 1.0}, report=True),
    Column("ddrm-ldm", 50),
)

NAMES = {
    "ddrm": "DDRM", "srldm": "SRLDM", "ddrm-srldm": "DDRM-SRLDM", "ddrm-ldm": "DDRM-LDM", "diffpir": "DiffPIR",
    "ddnm": "DDNM", "pigdm": "PiGDM", "reddiff": "RED-diff",
}  # fmt: skip
#: the options shown in a column's title even at their default value
KEY_OPTIONS = {"ddrm": ("eta",), "srldm": ("consistency",), "ddrm-srldm": ("strategy",), "ddrm-ldm": ("start", "stop")}
#: (in a title, in the metrics table's notes) why a setup is expected to fail
FAILURES = {
    "srldm": ("colour drift", "sampled from noise with no consistency step, nothing ties its colours to the "
              "measurement, so they drift (run SRLDM with consistency=true instead)"),
    "ddrm-srldm": ("checkerboard", "the latent model gives DDRM no pixel noise estimate, so DDRM keeps the noise "
                   "as checkerboard patterns (docs/methods.md; use DDRM-LDM instead)"),
}  # fmt: skip


def columns(methods: list[str] | None, report: bool, steps: Mapping[str, int]) -> list[Column]:
    """The demo's columns: the chosen set, or the named ``methods`` (the set's settings where the set
    has the method, else the registry's defaults); ``steps`` ({"*": N} and/or {method: N}) overrides
    the steps. Raises ValueError for an unknown method or option."""
    chosen = {c.method: c for c in (REPORT_COLUMNS if report else USER_COLUMNS)}
    if methods is None:
        methods = list(chosen)
    unknown = [m for m in steps if m != "*" and m not in METHODS]
    if unknown:
        raise ValueError(f"--steps: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    out = []
    for m in dict.fromkeys(methods):
        col = chosen.get(m) or Column(m, get_method(m).default_steps)
        check_options(m, dict(col.options))
        out.append(Column(m, steps.get(m, steps.get("*", col.steps)), col.options, col.report))
    return out


def shown_options(col: Column) -> dict[str, object]:
    """The options a title names: the key ones, and those set away from the registry's default."""
    defaults, used = method_options(col.method), used_options(col.method, dict(col.options))
    keys = [*KEY_OPTIONS.get(col.method, ()), *(k for k, v in col.options.items() if defaults.get(k) != v)]
    return {k: used[k] for k in dict.fromkeys(keys)}


def format_options(options: Mapping[str, object]) -> str:
    """``k=v, ...`` as the CLI writes options (booleans lower case)."""
    return ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items())


def failure(col: Column) -> tuple[str, str] | None:
    """(short, long) reason why this setup is expected to fail, or None."""
    if col.method == "srldm":
        return None if used_options(col.method, dict(col.options)).get("consistency") else FAILURES["srldm"]
    return FAILURES.get(col.method)


def label(col: Column) -> str:
    """The method's name and its tags, e.g. ``SRLDM (report; fails: colour drift)``."""
    tags = (["report"] if col.report else []) + ([f"fails: {why[0]}"] if (why := failure(col)) else [])
    name = NAMES.get(col.method, col.method)
    return f"{name} ({'; '.join(tags)})" if tags else name


def settings(col: Column) -> str:
    """``N steps`` and the shown options."""
    opts = format_options(shown_options(col))
    return f"{col.steps} steps" + (f", {opts}" if opts else "")


def title(col: Column) -> str:
    """The grid's column title: label, then steps and options, wrapped to fit a cell."""
    return "\n".join(textwrap.wrap(label(col), 24) + textwrap.wrap(settings(col), 26))


def baseline_title(tasks: list[str]) -> str:
    """The baseline column's title: what the baseline is when every task has the same one, else a
    pointer to the captions (which always name it)."""
    kinds = {get_task_spec(t).baseline_description for t in tasks}
    return "baseline (no model):\n" + kinds.pop() if len(kinds) == 1 else "baseline (no model):\nnamed under each image"


def baseline_note(tasks: list[str]) -> str:
    """One line for metrics.md: what the baseline is, per task."""
    by_kind: dict[str, list[str]] = {}
    for t in tasks:
        by_kind.setdefault(get_task_spec(t).baseline_description, []).append(t)
    return "baseline (no model): " + "; ".join(f"{', '.join(ts)}: {d}" for d, ts in by_kind.items())
