"""The diffusers UNet the built-in priors share, and the parameter count their model cards report."""

from __future__ import annotations

from torch import nn


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def unet2d(in_channels, out_channels, block_out_channels, layers_per_block, attention, norm_num_groups, sample_size):
    """The eps-prediction ``diffusers.UNet2DModel`` of the built-in priors: plain Down/Up blocks (attention in
    the mid block only, if ``attention``), scale-shift time conditioning."""
    from diffusers import UNet2DModel

    n = len(block_out_channels)
    return UNet2DModel(
        sample_size=int(sample_size),
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        block_out_channels=tuple(int(c) for c in block_out_channels),
        layers_per_block=int(layers_per_block),
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        add_attention=bool(attention),
        norm_num_groups=int(norm_num_groups),
        resnet_time_scale_shift="scale_shift",
    )
