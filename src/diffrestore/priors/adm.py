"""OpenAI guided-diffusion ("ADM") UNets realised as diffusers ``UNet2DModel``, plus checkpoint conversion.

The guided-diffusion ``UNetModel`` maps onto ``UNet2DModel`` block for block:

* ``ResBlock`` = ``ResnetBlock2D`` (``use_scale_shift_norm`` -> ``resnet_time_scale_shift="scale_shift"``);
  a ``ResBlock(up/down=True)`` (``resblock_updown``) = the resnet up/down-samplers of
  ``ResnetDownsampleBlock2D`` / ``AttnDownBlock2D(downsample_type="resnet")`` and
  ``ResnetUpsampleBlock2D`` / ``AttnUpBlock2D(upsample_type="resnet")``: both apply nearest-x2 / 2x2 average
  pooling after norm+SiLU and to the skip path, before the first conv;
* ``AttentionBlock`` = diffusers ``Attention`` with group norm and residual (SDPA via ``AttnProcessor2_0``);
  the Conv1d ``qkv`` (3C, C, 1) is split into ``to_q/to_k/to_v``: the legacy order packs it per head as
  (heads, [q, k, v], head_ch), the "new" order as ([q, k, v], heads, head_ch). ADM scales q and k by
  head_ch**-1/4 each, SDPA scales the product by head_ch**-1/2: the same function;
* sinusoidal timestep embedding cos-first (``flip_sin_to_cos=True, freq_shift=0``); GroupNorm(32, eps 1e-5),
  the middle-block attention included (``attn_norm_num_groups=32``; diffusers drops it for scale-shift
  otherwise);
* skip connections: ADM stores every input block's output, diffusers every resnet/attention/downsampler
  output plus ``conv_in``: the same list in the same order.

Two ADM options that ``UNet2DModel``'s config cannot express are patched after construction and recorded
under the private config key ``_adm`` (kept by ``save_pretrained``, ignored by ``from_config``):

* ``channel_mult[0] != 1`` (the 512x512 model, mult 0.5): ADM embeds t with ``num_channels`` sinusoids,
  diffusers with ``block_out_channels[0]``; ``time_proj``/``time_embedding`` are rebuilt with ``num_channels``;
* ``num_head_channels == -1`` (a fixed head count at every level): ``Attention.heads`` is set per block.

Use :func:`build_adm_unet` (not ``UNet2DModel(**cfg)``) so that both are applied. Reading, recognising and
converting guided-diffusion checkpoints is ``priors.adm_weights``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

__all__ = [
    "ADM_256_UNCOND",
    "ADM_256_COND",
    "ADM_256_UNCOND_HPARAMS",
    "ADM_256_COND_HPARAMS",
    "DEFAULT_CHANNEL_MULT",
    "adm_config",
    "build_adm_unet",
]

#: guided-diffusion ``create_model`` defaults when ``channel_mult=""``
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

# model_cfg keys that do not change the network's function at inference (or are DDRM/runner settings)
_IGNORED_KEYS = {
    "use_checkpoint", "use_fp16", "type", "var_type", "resamp_with_conv", "diffusion_steps",
    "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart", "rescale_timesteps",
    "rescale_learned_sigmas", "ema_rate", "out_ch",
}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# hyper-parameters -> UNet2DModel config


def _parse_channel_mult(channel_mult: Any, image_size: int) -> tuple[float, ...]:
    if channel_mult in ("", None):
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(f"no default channel_mult for image_size {image_size}; give channel_mult")
        return DEFAULT_CHANNEL_MULT[image_size]
    if isinstance(channel_mult, str):
        vals = [float(v) for v in channel_mult.replace(" ", "").split(",") if v]
    else:
        vals = [float(v) for v in channel_mult]
    return tuple(int(v) if float(v).is_integer() else v for v in vals)


def _parse_attention_ds(attention_resolutions: Any, image_size: int) -> tuple[int, ...]:
    """ADM gives attention levels as resolutions ("32,16,8"); the network uses downsample factors."""
    if attention_resolutions in ("", None):
        return ()
    if isinstance(attention_resolutions, str):
        res = [int(r) for r in attention_resolutions.replace(" ", "").split(",") if r]
    elif isinstance(attention_resolutions, int):
        res = [attention_resolutions]
    else:
        res = [int(r) for r in attention_resolutions]
    return tuple(sorted({image_size // r for r in res}))


def adm_config(
    image_size: int = 256,
    num_channels: int = 256,
    num_res_blocks: int = 2,
    channel_mult: Any = "",
    attention_resolutions: Any = "32,16,8",
    num_heads: int = 4,
    num_head_channels: int = 64,
    num_heads_upsample: int = -1,
    learn_sigma: bool = True,
    class_cond: bool = False,
    num_classes: int = 1000,
    resblock_updown: bool = True,
    use_scale_shift_norm: bool = True,
    use_new_attention_order: bool = False,
    in_channels: int = 3,
    out_channels: int | None = None,
    dropout: float = 0.0,
    **other: Any,
) -> dict[str, Any]:
    """``UNet2DModel`` config (plus the private ``_adm`` record) for guided-diffusion hyper-parameters.

    Arguments follow guided-diffusion's ``create_model`` (and DDRM's yaml ``model:`` section);
    ``out_channels`` is the eps channel count (default 3), doubled when ``learn_sigma`` (a value of
    2 * ``in_channels`` with ``learn_sigma`` is taken as the total already). Keys that do not
    affect inference (``use_fp16``, ``use_checkpoint``, ``var_type``, ...) are accepted and ignored;
    unknown keys raise ``ValueError``. Defaults are the released 256x256 models' settings, not
    guided-diffusion's script defaults.
    """
    unknown = set(other) - _IGNORED_KEYS
    if unknown:
        raise ValueError(f"unknown ADM hyper-parameter(s): {', '.join(sorted(unknown))}")
    image_size = int(image_size)
    mc = int(num_channels)
    mult = _parse_channel_mult(channel_mult, image_size)
    attn_ds = _parse_attention_ds(attention_resolutions, image_size)
    n_levels = len(mult)
    chans = [int(m * mc) for m in mult]
    eps_ch = 3 if out_channels is None else int(out_channels)
    out_ch = eps_ch * (2 if learn_sigma else 1)
    if learn_sigma and eps_ch == 2 * int(in_channels):  # already the total (eps + sigma) count
        out_ch = eps_ch
    attn_widths = [chans[lvl] for lvl in range(n_levels) if 2**lvl in attn_ds] + [chans[-1]]
    if num_head_channels != -1 and any(w % num_head_channels for w in attn_widths):
        raise ValueError(f"num_head_channels={num_head_channels} does not divide attention widths {attn_widths}")
    adm = {
        "image_size": image_size,
        "num_channels": mc,
        "num_res_blocks": int(num_res_blocks),
        "channel_mult": list(mult),
        "attention_ds": list(attn_ds),
        "num_heads": int(num_heads),
        "num_head_channels": int(num_head_channels),
        "num_heads_upsample": int(num_heads if num_heads_upsample == -1 else num_heads_upsample),
        "learn_sigma": bool(learn_sigma),
        "class_cond": bool(class_cond),
        "num_classes": int(num_classes),
        "resblock_updown": bool(resblock_updown),
        "use_scale_shift_norm": bool(use_scale_shift_norm),
        "use_new_attention_order": bool(use_new_attention_order),
        "in_channels": int(in_channels),
        "out_channels": out_ch,
    }
    return {**_unet2d_config(adm, chans, float(dropout)), "_adm": adm}


def _unet2d_config(adm: Mapping[str, Any], chans: list[int], dropout: float) -> dict[str, Any]:
    """The ``UNet2DModel`` keyword arguments of the network an ``_adm`` record describes."""
    n_levels, attn_ds, updown = len(chans), adm["attention_ds"], adm["resblock_updown"]
    plain_down = "ResnetDownsampleBlock2D" if updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if updown else "UpBlock2D"
    down = ["AttnDownBlock2D" if 2**lvl in attn_ds else plain_down for lvl in range(n_levels)]
    up = ["AttnUpBlock2D" if 2**lvl in attn_ds else plain_up for lvl in reversed(range(n_levels))]
    head_channels = adm["num_head_channels"]
    return {
        "sample_size": adm["image_size"],
        "in_channels": adm["in_channels"],
        "out_channels": adm["out_channels"],
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": 4 * adm["num_channels"],
        "freq_shift": 0,
        "flip_sin_to_cos": True,
        "down_block_types": tuple(down),
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": tuple(up),
        "block_out_channels": tuple(chans),
        "layers_per_block": adm["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv",
        "dropout": dropout,
        "act_fn": "silu",
        "attention_head_dim": head_channels if head_channels != -1 else None,
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if adm["use_scale_shift_norm"] else "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": adm["num_classes"] if adm["class_cond"] else None,
    }


#: hyper-parameters of the released ``256x256_diffusion_uncond.pt`` / ``256x256_diffusion.pt``
ADM_256_UNCOND_HPARAMS: dict[str, Any] = dict(
    image_size=256, num_channels=256, num_res_blocks=2, channel_mult="", attention_resolutions="32,16,8",
    num_heads=4, num_head_channels=64, num_heads_upsample=-1, learn_sigma=True, class_cond=False,
    resblock_updown=True, use_scale_shift_norm=True, use_new_attention_order=False,
)  # fmt: skip
ADM_256_COND_HPARAMS: dict[str, Any] = {**ADM_256_UNCOND_HPARAMS, "class_cond": True}
ADM_256_UNCOND: dict[str, Any] = adm_config(**ADM_256_UNCOND_HPARAMS)
ADM_256_COND: dict[str, Any] = adm_config(**ADM_256_COND_HPARAMS)


def build_adm_unet(
    cfg: Mapping[str, Any], *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> UNet2DModel:
    """Instantiate the ``UNet2DModel`` for an :func:`adm_config` dict (ADM hyper-parameters are accepted too).

    ``device="meta"`` builds it without allocating weights (then ``load_state_dict(..., assign=True)``).
    Returned in eval mode.
    """
    if "block_out_channels" not in cfg:
        cfg = adm_config(**cfg)
    kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
    adm = cfg.get("_adm")
    with torch.device(device if device is not None else "cpu"):
        model = UNet2DModel(**kwargs)
        if adm is not None:
            _apply_adm_patches(model, adm)
    if adm is not None:
        model.register_to_config(_adm=dict(adm))
    if dtype is not None:
        torch.nn.Module.to(model, dtype=dtype)
    return model.eval()


def _apply_adm_patches(model: UNet2DModel, adm: Mapping[str, Any]) -> None:
    mc = adm["num_channels"]
    if model.config.block_out_channels[0] != mc:  # channel_mult[0] != 1: t is embedded with mc sinusoids
        model.time_proj = Timesteps(mc, flip_sin_to_cos=True, downscale_freq_shift=0)
        model.time_embedding = TimestepEmbedding(mc, 4 * mc)
    if adm["num_head_channels"] == -1:  # fixed head count; diffusers was built with one head per block
        for prefix, heads in (("down_blocks", adm["num_heads"]), ("mid_block", adm["num_heads"]),
                              ("up_blocks", adm["num_heads_upsample"])):  # fmt: skip
            for name, mod in model.named_modules():
                if name.startswith(prefix) and isinstance(mod, Attention):
                    c = mod.to_q.out_features
                    if c % heads:
                        raise ValueError(f"num_heads={heads} does not divide {c} channels")
                    mod.heads = heads
