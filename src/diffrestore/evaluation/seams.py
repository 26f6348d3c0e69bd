"""Where the evaluation meets heavy or optional parts: the prior loader, the Inception features, plugins.

``DIFFRESTORE_PLUGINS="pkg.mod:fn,other.mod"`` imports each module (and calls ``fn()``) in every
evaluation process, spawned ranks included, before anything else: a plugin may register a method in
``diffrestore.methods.METHODS`` or replace :func:`load_eval_prior` / :func:`load_feature_extractor`
here (the tests' stand-ins do both). The runner looks them up on this module at call time.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import torch

from diffrestore.errors import EvalError

PLUGINS_ENV = "DIFFRESTORE_PLUGINS"

_LOADED_PLUGINS: set[str] = set()


class FeaturesUnavailable(Exception):
    """The Inception network cannot be used; the message is the FID column's reason."""


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


def load_eval_prior(spec: str, device: str, dtype: str, kind: str, adm_config: dict | None = None, frozen_graphs: bool = False):
    """A ``kind`` ("pixel" / "latent") prior from a spec (path or builtin:NAME); dtype fp32/fp16/bf16;
    ``adm_config``: ADM hyper-parameters an ADM checkpoint does not store (``--adm-config``);
    ``frozen_graphs``: run its network as frozen TorchScript graphs (``--frozen-graphs``)."""
    from diffrestore.priors.loading import load_prior

    return load_prior(spec, device=device, dtype=dtype, kind=kind, adm_config=adm_config, frozen_graphs=frozen_graphs)


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
