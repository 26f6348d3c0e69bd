"""Restoration methods: each one a function ``restore(prior, operator, y, *, sigma_y, steps, ...)``.

The registry below is what the CLI, the evaluation grid and the demo read, so a method added here
is reachable everywhere. ``prior`` says which kind of prior the method needs.
"""

from __future__ import annotations

import importlib
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
