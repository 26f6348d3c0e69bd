"""Restoration methods: each one a module with a sampler ``restore(prior, operator, y, *, sigma_y,
steps, ...)`` that draws one restoration per measurement, and ``check_values(**options)``, which
rejects out-of-range option values without a model (so a command can refuse them before it writes
anything).

The registry below names each method's sampler and checker directly; the CLI, the evaluation grid and
the demo read it, so a method added here is reachable everywhere. ``prior`` says which kind of prior
the method needs. Through the registry every method also takes ``samples=N`` (the mean of N draws,
see ``MethodInfo.restore``).

A sampler's keyword defaults are written only in its signature (``default_steps`` reads ``steps``
there): its paper's (or official code's) settings, except that some take fewer steps than their paper
(the summary says so). ``MethodInfo.recommended`` overrides some options with values that measured
better (docs/results/2026-12-03-defaults.md); the registry applies those unless told ``paper=True``
(the ``paper`` preset), so a run can reproduce either.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from . import ddnm, ddrm, ddrm_ldm, ddrm_srldm, diffpir, pigdm, reddiff, srldm
from .common import MethodArgumentError, check_samples, draws_of_samples


@dataclass(frozen=True)
class MethodInfo:
    name: str
    #: the method's ``restore``: one draw per measurement
    sampler: Callable[..., torch.Tensor]
    prior: str  # "pixel" or "latent"
    summary: str
    #: the method's ``check_values(**options)``: raises MethodArgumentError for a value out of range
    checker: Callable[..., None] | None = None
    #: the method differentiates through the prior's network (so frozen TorchScript graphs cannot serve it)
    needs_gradients: bool = False
    #: option values used instead of the sampler's (the paper's) defaults, because they measured better
    recommended: Mapping[str, object] = field(default_factory=dict, hash=False)

    @property
    def default_steps(self) -> int:
        """The ``steps`` default of the sampler's signature."""
        return inspect.signature(self.sampler).parameters["steps"].default

    def check_values(self, options: dict) -> None:
        """Raise MethodArgumentError for an option value out of range (the method's checker on the
        defaults updated with ``options``); needs no model."""
        check_samples(options.get("samples", 1))
        if self.checker is not None:  # checkers take the options they judge and ignore the rest
            self.checker(**{**method_options(self.name), **options})

    def with_defaults(self, kwargs: dict, *, paper: bool = False) -> dict:
        """``kwargs`` with the recommended value of every option they leave out (none with ``paper``:
        the sampler's own defaults then apply)."""
        return dict(kwargs) if paper else {**self.recommended, **kwargs}

    def restore_draws(self, prior, operator, y: torch.Tensor, *, samples: int, paper: bool = False, **kwargs) -> torch.Tensor:
        """``samples`` independent restorations of each measurement, drawn as one batch: (B, samples, ...).
        The callback, if any, sees that batch. Options left out take the recommended defaults
        (the sampler's with ``paper``)."""
        kwargs = self.with_defaults(kwargs, paper=paper)
        if samples != 1 and (kwargs.get("randn") is not None or kwargs.get("x_T") is not None):
            raise MethodArgumentError("x_T and randn replay one sample per measurement; use them with samples=1")
        return draws_of_samples(lambda ys: self.sampler(prior, operator, ys, **kwargs), y, samples)

    def restore(self, prior, operator, y: torch.Tensor, *, samples: int = 1, paper: bool = False, **kwargs) -> torch.Tensor:
        """The method's restoration of ``y``; with ``samples`` > 1 the mean of that many independent
        draws per measurement.

        Why a mean: a diffusion method returns a sample of the posterior, whose squared error is
        about twice the posterior mean's; averaging samples estimates the mean, which PSNR / SSIM
        reward, at ``samples`` times the cost (and with smoother output). 1, the default, is one draw:
        bit for bit the sampler called with the same options. Options left out take the recommended
        defaults; ``paper=True`` leaves them to the sampler (the published method).
        """
        if type(samples) is int and samples == 1:
            return self.sampler(prior, operator, y, **self.with_defaults(kwargs, paper=paper))
        return self.restore_draws(prior, operator, y, samples=samples, paper=paper, **kwargs).mean(dim=1)


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in [
        MethodInfo("ddrm", ddrm.restore, "pixel", "DDRM (Kawar et al. 2022) with a pixel diffusion prior",
                   checker=ddrm.check_values, recommended={"consistency": True}),
        MethodInfo("srldm", srldm.restore, "latent", "latent SR diffusion conditioned on the (downscaled) measurement",
                   checker=srldm.check_values, recommended={"consistency": True}),
        MethodInfo("ddrm-srldm", ddrm_srldm.restore, "latent", "the report's DDRM with the latent SR model as denoiser",
                   checker=ddrm_srldm.check_values),
        MethodInfo("ddrm-ldm", ddrm_ldm.restore, "latent", "latent diffusion with pixel-space DDRM-style data consistency",
                   checker=ddrm_ldm.check_values),
        MethodInfo("diffpir", diffpir.restore, "pixel", "DiffPIR (Zhu et al. 2023): plug-and-play with the diffusion denoiser",
                   checker=diffpir.check_values),
        MethodInfo("ddnm", ddnm.restore, "pixel", "DDNM (Wang et al. 2023): range-null-space projection; DDNM+ when sigma_y > 0",
                   checker=ddnm.check_values),
        MethodInfo("pigdm", pigdm.restore, "pixel",
                   "PiGDM (Song et al. 2023): pseudo-inverse guidance through the network's Jacobian (paper: 100 steps)",
                   checker=pigdm.check_values, needs_gradients=True),
        MethodInfo("reddiff", reddiff.restore, "pixel",
                   "RED-diff (Mardani et al. 2024): Adam on the mean, the denoiser as regulariser (paper: 1000 steps)",
                   checker=reddiff.check_values),
    ]
}


def get_method(name: str) -> MethodInfo:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


# set by restoration.run_method for every method, so never a user option
_PIPELINE_ARGS = {"sigma_y", "steps"}
# options the registry adds to every method (``MethodInfo.restore``)
COMMON_OPTIONS = {"samples": 1}
COMMON_DESCRIPTIONS = {"samples": "the mean of this many independent draws (an estimate of the posterior mean, N times the cost)"}
#: what ``preset`` may be where a command takes one: the registry's recommended defaults or the papers'
OPTION_PRESETS = ("recommended", "paper")


def check_frozen_graphs(methods, frozen_graphs: bool) -> None:
    """Refuse frozen graphs for a method that needs gradients through the network, before anything runs."""
    for name in methods:
        if frozen_graphs and get_method(name).needs_gradients:
            raise MethodArgumentError(f"{name} needs gradients through the prior's network; run without --frozen-graphs")


def method_options(name: str, *, paper: bool = False) -> dict[str, object]:
    """The tunable options of a method (keyword arguments of its ``restore`` with a number, flag or
    string default, plus ``COMMON_OPTIONS``) and their defaults, the recommended ones unless ``paper``:
    what ``restore --eta`` or ``evaluate --options`` may set."""
    info = get_method(name)
    params = inspect.signature(info.sampler).parameters.values()
    own = {
        p.name: p.default
        for p in params
        if p.kind is p.KEYWORD_ONLY and p.name not in _PIPELINE_ARGS and isinstance(p.default, (int, float, str))
    }
    if not paper:
        own.update(info.recommended)
    return {**own, **COMMON_OPTIONS}


def preset_options(name: str, preset: str | None = None) -> dict[str, object]:
    """The value under ``preset`` ("paper": the sampler's; None or "recommended": the registry's) of
    every option whose recommended default differs from the paper's: what a command passes
    explicitly so that its run and its record do not depend on which defaults apply."""
    if preset not in (None, *OPTION_PRESETS):
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(OPTION_PRESETS)}")
    chosen = method_options(name, paper=preset == "paper")
    return {k: chosen[k] for k in get_method(name).recommended}


def option_descriptions(name: str) -> dict[str, str]:
    """One line per option of ``name``: the first sentence of its entry in the ``Args:`` block of the
    sampler's docstring (an entry may name several options, ``a, b: ...``)."""
    doc = inspect.getdoc(get_method(name).sampler) or ""
    block = doc.partition("Args:")[2]
    entries: dict[str, str] = {}
    names: list[str] = []
    for line in block.splitlines():
        if line and not line.startswith(" "):  # the next section (Returns:)
            break
        entry = re.match(r"^    ([\w, ]+):\s(.*)$", line)
        if entry:
            names = [n.strip() for n in entry.group(1).split(",")]
            for n in names:
                entries[n] = entry.group(2).strip()
        elif line.startswith("        ") and names:
            for n in names:
                entries[n] += " " + line.strip()
    first = {k: re.split(r"(?<=\.)\s+(?=[A-Z])", v)[0].replace("``", "") for k, v in entries.items()}
    return {k: first.get(k, COMMON_DESCRIPTIONS.get(k, "")) for k in method_options(name)}


def check_options(name: str, options: dict) -> dict:
    """``options`` without the unset (None) ones, text values converted to the type of the option's
    default; a ValueError names an option the method lacks, a value of the wrong type or one out of
    range (``MethodInfo.check_values``), before any model is loaded or any output written."""
    known = method_options(name)
    given = {}
    for key, value in options.items():
        if value is None:
            continue
        if key not in known:
            raise ValueError(f"method {name} has no option {key!r} (its options: {', '.join(known) or 'none'})")
        given[key] = _convert(name, key, value, type(known[key]))
    try:
        get_method(name).check_values(given)
    except ValueError as e:
        raise ValueError(f"method {name}: {e}") from None
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
