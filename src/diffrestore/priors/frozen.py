"""Networks run as frozen TorchScript graphs, for inference speed (opt-in: ``prior.use_frozen_graphs()``).

Why: a small network spends a large share of each call outside its convolutions — Python dispatch in
diffusers' forward, weight re-layout before every oneDNN convolution, separate element-wise kernels. A
graph traced once, frozen (weights become constants) and passed through ``torch.jit.optimize_for_inference``
(pre-packed oneDNN weights, fused conv + add/activation on CPU) removes some of that. It pays off for the
latent UNets but not for a pixel UNet in fp32 on a CPU (docs/methods.md), so ``frozen_graphs_pay_off``
leaves that one eager.

A graph is traced per input signature (shapes, dtypes, device), because diffusers' forward takes Python
branches on shapes; the first call with a new signature traces it (about a second for the small priors)
and checks it against the eager network before use. Each graph holds its own copy of the weights.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .base import LatentSRPrior

__all__ = ["FrozenGraphError", "FrozenGraphs", "FrozenUNetMixin", "UNetSample", "frozen_graphs_pay_off"]


class FrozenGraphError(ValueError):
    """A traced graph that does not reproduce its network (the CLI reports it in one line)."""


class UNetSample(nn.Module):
    """A diffusers ``UNet2DModel`` as a function of tensors only (``sample``), as tracing needs."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t, class_labels=class_labels, return_dict=False)[0]


def _signature(inputs: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)


class FrozenGraphs:
    """Call ``module(*inputs)`` through a frozen graph traced for the inputs' signature."""

    #: largest accepted difference between graph and eager network, relative to the output's scale;
    #: at least 8 units in the last place of the output's dtype: a traced bf16 network rounds at other
    #: places and its error grows through the layers (~2% of the output scale on the tiny golden LDM),
    #: while a wrong trace (another branch, a baked-in value) is off by the order of the output itself
    tolerance = 1e-3

    def __init__(self, module: nn.Module):
        self.module = module.eval()
        self.graphs: dict[tuple, torch.jit.ScriptModule] = {}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = _signature(inputs)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._freeze(inputs)
        return graph(*inputs)

    def _freeze(self, inputs: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about diffusers' shape checks: keyed by shape
            traced = torch.jit.trace(self.module, inputs, check_trace=False)
            graph = torch.jit.freeze(traced)
            if all(x.device.type == "cpu" for x in inputs):
                graph = torch.jit.optimize_for_inference(graph)
            expected = self.module(*inputs)
            got = graph(*inputs)
        err = float((got.float() - expected.float()).abs().max())
        scale = float(expected.float().abs().max()) or 1.0
        tolerance = max(self.tolerance, 8 * torch.finfo(expected.dtype).eps)
        if not err <= tolerance * scale:
            raise FrozenGraphError(f"frozen graph differs from the network by {err:.3g} (scale {scale:.3g}); "
                                   "run without frozen graphs")  # fmt: skip
        return graph


class FrozenUNetMixin:
    """For priors whose network is ``self.unet`` (a diffusers ``UNet2DModel``): eager or frozen calls."""

    _frozen_unet: FrozenGraphs | None = None
    _channels_last = False

    def use_frozen_graphs(self, enabled: bool = True):
        """Run the UNet as frozen graphs from now on (or eagerly again); returns the prior."""
        self._frozen_unet = FrozenGraphs(UNetSample(self.unet)) if enabled else None
        return self

    def use_channels_last(self, enabled: bool = True):
        """Keep the UNet's weights and inputs in channels-last memory format (or the default one again), oneDNN's
        own layout on a CPU, which saves its layout conversions in every convolution (docs/methods.md). Results
        differ by float rounding only."""
        torch.nn.Module.to(self.unet, memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self._channels_last = bool(enabled)
        if self._frozen_unet is not None:  # graphs hold the weights in the old layout: trace again
            self.use_frozen_graphs()
        return self

    @property
    def uses_channels_last(self) -> bool:
        return self._channels_last

    @property
    def uses_frozen_graphs(self) -> bool:
        return self._frozen_unet is not None

    def unet_sample(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's output tensor for ``(x, t[, class_labels])``."""
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._frozen_unet is None:
            return self.unet(x, t, class_labels=class_labels, return_dict=False)[0]
        args = (x, t) if class_labels is None else (x, t, class_labels)
        return self._frozen_unet(*args)


def frozen_graphs_pay_off(prior) -> bool:
    """Whether frozen graphs run ``prior`` faster than eager: latent priors always; a pixel prior not in float32
    on a CPU, where its frozen graph is slower (its large convolutions gain nothing from pre-packing while
    the graph loses PyTorch's eager oneDNN paths)."""
    if isinstance(prior, LatentSRPrior):
        return True
    weight = next(prior.unet.parameters())
    return not (weight.dtype == torch.float32 and weight.device.type == "cpu")
