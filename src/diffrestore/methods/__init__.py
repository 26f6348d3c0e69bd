"""Restoration methods: each one a module with a function ``restore(prior, operator, y, *, sigma_y,
steps, ...)`` that draws one restoration per measurement, and optionally ``check_values(**options)``,
which rejects out-of-range option values without a model (so a command can refuse them before it
writes anything).

The registry below is what the CLI, the evaluation grid and the demo read, so a method added here
is reachable everywhere. ``prior`` says which kind of prior the method needs. Through the registry
every method also takes ``samples=N`` (the mean of N draws, see ``MethodInfo.restore``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from .common import MethodArgumentError, check_samples, draws_of_samples


@dataclass(frozen=True)
class MethodInfo:
    name: str
    module: str
    prior: str  # "pixel" or "latent"
    default_steps: int
    summary: str
    #: the method differentiates through the prior's network (so frozen TorchScript graphs cannot serve it)
    needs_gradients: bool = False

    @property
    def implementation(self) -> ModuleType:
        return importlib.import_module(f"diffrestore.methods.{self.module}")

    @property
    def sampler(self) -> Callable:
        """The module's ``restore``: one draw per measurement."""
        return self.implementation.restore

    def check_values(self, options: dict) -> None:
        """Raise MethodArgumentError for an option value out of range (the module's ``check_values``
        on the defaults updated with ``options``); needs no model."""
        check_samples(options.get("samples", 1))
        checker = getattr(self.implementation, "check_values", None)
        if checker is not None:  # module checkers take the options they judge and ignore the rest
            checker(**{**method_options(self.name), **options})

    def restore_draws(self, prior, operator, y: torch.Tensor, *, samples: int, **kwargs) -> torch.Tensor:
        """``samples`` independent restorations of each measurement, drawn as one batch: (B, samples, ...).
        The callback, if any, sees that batch."""
        if samples != 1 and (kwargs.get("randn") is not None or kwargs.get("x_T") is not None):
            raise MethodArgumentError("x_T and randn replay one sample per measurement; use them with samples=1")
        return draws_of_samples(lambda ys: self.sampler(prior, operator, ys, **kwargs), y, samples)

    def restore(self, prior, operator, y: torch.Tensor, *, samples: int = 1, **kwargs) -> torch.Tensor:
        """The method's restoration of ``y``; with ``samples`` > 1 the mean of that many independent
        draws per measurement.

        Why a mean: a diffusion method returns a sample of the posterior, whose squared error is
        about twice the posterior mean's; averaging samples estimates the mean, which PSNR / SSIM
        reward, at ``samples`` times the cost (and with smoother output). 1, the default, is the
        published method: one draw, bit for bit the module's ``restore``.
        """
        if type(samples) is int and samples == 1:
            return self.sampler(prior, operator, y, **kwargs)
        return self.restore_draws(prior, operator, y, samples=samples, **kwargs).mean(dim=1)


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in [
        MethodInfo("ddrm", "ddrm", "pixel", 20, "DDRM (Kawar et al. 2022) with a pixel diffusion prior"),
        MethodInfo("srldm", "srldm", "latent", 100, "latent SR diffusion conditioned on the (downscaled) measurement"),
        MethodInfo("ddrm-srldm", "ddrm_srldm", "latent", 20, "the report's DDRM with the latent SR model as denoiser"),
        MethodInfo("ddrm-ldm", "ddrm_ldm", "latent", 50, "latent diffusion with pixel-space DDRM-style data consistency"),
        # 20 network calls as in the comparison; the DiffPIR paper's default is 100
        MethodInfo("diffpir", "diffpir", "pixel", 20, "DiffPIR (Zhu et al. 2023): plug-and-play with the diffusion denoiser"),
        MethodInfo("ddnm", "ddnm", "pixel", 100,
                   "DDNM (Wang et al. 2023): range-null-space projection; DDNM+ when sigma_y > 0"),
        MethodInfo("pigdm", "pigdm", "pixel", 20,
                   "PiGDM (Song et al. 2023): pseudo-inverse guidance through the network's Jacobian (paper: 100 steps)",
                   needs_gradients=True),
        MethodInfo("reddiff", "reddiff", "pixel", 20,
                   "RED-diff (Mardani et al. 2024): Adam on the mean, the denoiser as regulariser (paper: 1000 steps)"),
    ]
}


def get_method(name: str) -> MethodInfo:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


# set by the pipeline for every method, so never a user option
_PIPELINE_ARGS = {"sigma_y", "steps"}
# options the registry adds to every method (``MethodInfo.restore``)
COMMON_OPTIONS = {"samples": 1}


def check_frozen_graphs(methods, frozen_graphs: bool) -> None:
    """Refuse frozen graphs for a method that needs gradients through the network, before anything runs."""
    for name in methods:
        if frozen_graphs and get_method(name).needs_gradients:
            raise MethodArgumentError(f"{name} needs gradients through the prior's network; run without --frozen-graphs")


def method_options(name: str) -> dict[str, object]:
    """The tunable options of a method (keyword arguments of its ``restore`` with a number, flag or
    string default, plus ``COMMON_OPTIONS``) and their defaults: what ``restore --eta`` or
    ``evaluate --options`` may set."""
    params = inspect.signature(get_method(name).sampler).parameters.values()
    own = {
        p.name: p.default
        for p in params
        if p.kind is p.KEYWORD_ONLY and p.name not in _PIPELINE_ARGS and isinstance(p.default, (int, float, str))
    }
    return {**own, **COMMON_OPTIONS}


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
