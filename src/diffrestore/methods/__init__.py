"""Restoration methods: each one a function ``restore(prior, operator, y, *, sigma_y, steps, ...)``.

The registry below is what the CLI, the evaluation grid and the demo read, so a method added here
is reachable everywhere. ``prior`` says which kind of prior the method needs.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class MethodInfo:
    name: str
    module: str
    prior: str  # "pixel" or "latent"
    default_steps: int
    summary: str

    @property
    def restore(self) -> Callable:
        return importlib.import_module(f"diffrestore.methods.{self.module}").restore


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in [
        MethodInfo("ddrm", "ddrm", "pixel", 20, "DDRM (Kawar et al. 2022) with a pixel diffusion prior"),
        MethodInfo("srldm", "srldm", "latent", 100, "latent SR diffusion conditioned on the (downscaled) measurement"),
        MethodInfo("ddrm-srldm", "ddrm_srldm", "latent", 20, "the report's DDRM with the latent SR model as denoiser"),
        MethodInfo("ddrm-ldm", "ddrm_ldm", "latent", 50, "latent diffusion with pixel-space DDRM-style data consistency"),
    ]
}


def get_method(name: str) -> MethodInfo:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


# set by the pipeline for every method, so never a user option
_PIPELINE_ARGS = {"sigma_y", "steps"}


def method_options(name: str) -> dict[str, object]:
    """The tunable options of a method (keyword arguments of its ``restore`` with a number, flag or
    string default) and their defaults: what ``restore --eta`` or ``evaluate --options`` may set."""
    params = inspect.signature(get_method(name).restore).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.kind is p.KEYWORD_ONLY and p.name not in _PIPELINE_ARGS and isinstance(p.default, (int, float, str))
    }


def check_options(name: str, options: dict) -> dict:
    """``options`` without the unset (None) ones, text values converted to the type of the option's
    default; a ValueError names an option the method lacks or a value of the wrong type."""
    known = method_options(name)
    given = {}
    for key, value in options.items():
        if value is None:
            continue
        if key not in known:
            raise ValueError(f"method {name} has no option {key!r} (its options: {', '.join(known) or 'none'})")
        given[key] = _convert(name, key, value, type(known[key]))
    return given


def _convert(name: str, key: str, value, kind: type):
    if not isinstance(value, str) or kind is str:
        return value
    try:
        if kind is bool:
            return {"true": True, "1": True, "false": False, "0": False}[value.strip().lower()]
        return kind(value)
    except (KeyError, ValueError):
        raise ValueError(f"method {name} option {key}: {value!r} is not a {kind.__name__}") from None
