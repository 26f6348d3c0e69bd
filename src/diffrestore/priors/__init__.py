"""Priors: a trained diffusion network plus its noise schedule (see ``base``).

The public names are imported on first use: most pull in diffusers (seconds), which listing the built-in
priors or importing ``priors.base`` should not pay for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "load_prior",
    "PriorLoadError",
    "PixelPrior",
    "LatentSRPrior",
    "UNetPixelPrior",
    "DiffusersLatentSRPrior",
    "list_builtin_priors",
]

_WHERE = {
    "load_prior": "loading",
    "PriorLoadError": "base",
    "PixelPrior": "base",
    "LatentSRPrior": "base",
    "UNetPixelPrior": "pixel",
    "DiffusersLatentSRPrior": "latent",
    "list_builtin_priors": "catalog",
}

if TYPE_CHECKING:
    from .base import LatentSRPrior, PixelPrior, PriorLoadError
    from .catalog import list_builtin_priors
    from .latent import DiffusersLatentSRPrior
    from .loading import load_prior
    from .pixel import UNetPixelPrior


def __getattr__(name: str):
    if name not in _WHERE:  # AttributeError lets `from diffrestore.priors import adm` import the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
