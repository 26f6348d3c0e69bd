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

Use :func:`build_adm_unet` (not ``UNet2DModel(**cfg)``) so that both are applied.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

__all__ = [
    "ADMGuessWarning",
    "ADM_256_UNCOND",
    "ADM_256_COND",
    "ADM_256_UNCOND_HPARAMS",
    "ADM_256_COND_HPARAMS",
    "DEFAULT_CHANNEL_MULT",
    "adm_config",
    "build_adm_unet",
    "convert_adm_state_dict",
    "convert_diffusers_to_adm_state_dict",
    "infer_adm_hparams",
    "is_adm_state_dict",
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
    plain_down = "ResnetDownsampleBlock2D" if resblock_updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if resblock_updown else "UpBlock2D"
    down = ["AttnDownBlock2D" if 2**lvl in attn_ds else plain_down for lvl in range(n_levels)]
    up = ["AttnUpBlock2D" if 2**lvl in attn_ds else plain_up for lvl in reversed(range(n_levels))]
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
    return {
        "sample_size": image_size,
        "in_channels": int(in_channels),
        "out_channels": out_ch,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": 4 * mc,
        "freq_shift": 0,
        "flip_sin_to_cos": True,
        "down_block_types": tuple(down),
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": tuple(up),
        "block_out_channels": tuple(chans),
        "layers_per_block": int(num_res_blocks),
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "resnet" if resblock_updown else "conv",
        "upsample_type": "resnet" if resblock_updown else "conv",
        "dropout": float(dropout),
        "act_fn": "silu",
        "attention_head_dim": int(num_head_channels) if num_head_channels != -1 else None,
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if use_scale_shift_norm else "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": int(num_classes) if class_cond else None,
        "_adm": adm,
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


def _adm_of(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``_adm`` record of a config from :func:`adm_config`, or ADM hyper-parameters themselves."""
    if "_adm" in cfg:
        return dict(cfg["_adm"])
    if "block_out_channels" in cfg:
        raise ValueError("config has no '_adm' record: it was not made by adm_config()")
    return adm_config(**cfg)["_adm"]


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


# --------------------------------------------------------------------------------------------------
# state-dict conversion

_RES_MAP = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _layout(adm: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(ADM module prefix, diffusers module prefix, kind) for every module with weights.

    kind: "plain" (same parameter names and shapes), "res" (ResBlock), "attn_down"/"attn_up" (attention
    block, head count from the down / up settings).
    """
    n_levels = len(adm["channel_mult"])
    nrb = adm["num_res_blocks"]
    attn = set(adm["attention_ds"])
    updown = adm["resblock_updown"]
    out: list[tuple[str, str, str]] = [
        ("time_embed.0", "time_embedding.linear_1", "plain"),
        ("time_embed.2", "time_embedding.linear_2", "plain"),
    ]
    if adm["class_cond"]:
        out.append(("label_emb", "class_embedding", "plain"))
    out.append(("input_blocks.0.0", "conv_in", "plain"))
    k, ds = 1, 1
    for lvl in range(n_levels):
        for j in range(nrb):
            out.append((f"input_blocks.{k}.0", f"down_blocks.{lvl}.resnets.{j}", "res"))
            if ds in attn:
                out.append((f"input_blocks.{k}.1", f"down_blocks.{lvl}.attentions.{j}", "attn_down"))
            k += 1
        if lvl != n_levels - 1:
            if updown:
                out.append((f"input_blocks.{k}.0", f"down_blocks.{lvl}.downsamplers.0", "res"))
            else:
                out.append((f"input_blocks.{k}.0.op", f"down_blocks.{lvl}.downsamplers.0.conv", "plain"))
            k += 1
            ds *= 2
    out += [
        ("middle_block.0", "mid_block.resnets.0", "res"),
        ("middle_block.1", "mid_block.attentions.0", "attn_down"),
        ("middle_block.2", "mid_block.resnets.1", "res"),
    ]
    k = 0
    for i, lvl in enumerate(reversed(range(n_levels))):
        for j in range(nrb + 1):
            out.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", "res"))
            sub = 1
            if ds in attn:
                out.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", "attn_up"))
                sub = 2
            if lvl and j == nrb:
                if updown:
                    out.append((f"output_blocks.{k}.{sub}", f"up_blocks.{i}.upsamplers.0", "res"))
                else:
                    out.append((f"output_blocks.{k}.{sub}.conv", f"up_blocks.{i}.upsamplers.0.conv", "plain"))
                ds //= 2
            k += 1
    out += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return out


def _heads(adm: Mapping[str, Any], kind: str, channels: int) -> int:
    if adm["num_head_channels"] != -1:
        if channels % adm["num_head_channels"]:
            raise ValueError(f"num_head_channels={adm['num_head_channels']} does not divide {channels} channels")
        return channels // adm["num_head_channels"]
    return adm["num_heads"] if kind == "attn_down" else adm["num_heads_upsample"]


def _split_qkv(t: torch.Tensor, heads: int, legacy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Conv1d qkv weight (3C, C[, 1]) or bias (3C,) -> q, k, v as Linear weight (C, C) / bias (C,)."""
    rest = t.shape[1:2]  # (C,) for the weight, () for the bias
    c = t.shape[0] // 3
    hc = c // heads
    w = t.reshape(3 * c, *rest)
    if legacy:  # (heads, [q,k,v], head_ch)
        w = w.reshape(heads, 3, hc, *rest)
        return tuple(w[:, i].reshape(c, *rest) for i in range(3))  # type: ignore[return-value]
    w = w.reshape(3, c, *rest)  # ([q,k,v], heads, head_ch)
    return w[0], w[1], w[2]


def _merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, legacy: bool) -> torch.Tensor:
    c = q.shape[0]
    rest = q.shape[1:2]
    hc = c // heads
    if legacy:
        stacked = torch.stack([t.reshape(heads, hc, *rest) for t in (q, k, v)], dim=1)  # (heads, 3, hc, ...)
    else:
        stacked = torch.stack([q, k, v], dim=0)
    out = stacked.reshape(3 * c, *rest)
    return out.unsqueeze(-1) if rest else out


def convert_adm_state_dict(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """guided-diffusion ``UNetModel`` state dict -> ``UNet2DModel`` state dict for :func:`adm_config` ``cfg``.

    ``cfg`` may also be the ADM hyper-parameters. Tensors are reused where the layout allows (no copy),
    only the attention projections are re-packed. Raises ``ValueError`` naming the first missing or
    unexpected key.
    """
    return _convert(sd, cfg, to_diffusers=True)


def convert_diffusers_to_adm_state_dict(
    sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_adm_state_dict` (works on ``meta`` tensors too)."""
    return _convert(sd, cfg, to_diffusers=False)


def _convert(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], to_diffusers: bool) -> dict[str, torch.Tensor]:
    """Both directions walk one layout, so the two conversions cannot drift apart."""
    adm = _adm_of(cfg)
    legacy = not adm["use_new_attention_order"]
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(
                f"missing key {key!r} expected by the ADM layout" if to_diffusers else f"missing diffusers key {key!r}"
            )
        used.add(key)
        return sd[key]

    def rename(adm_key: str, diffusers_key: str) -> None:
        if to_diffusers:
            out[diffusers_key] = take(adm_key)
        else:
            out[adm_key] = take(diffusers_key)

    for src, dst, kind in _layout(adm):
        if kind == "plain":
            for p in ("weight",) if src == "label_emb" else ("weight", "bias"):
                rename(f"{src}.{p}", f"{dst}.{p}")
        elif kind == "res":
            for a, b in _RES_MAP.items():
                if a == "skip_connection" and (f"{src}.{a}.weight" if to_diffusers else f"{dst}.{b}.weight") not in sd:
                    continue
                for p in ("weight", "bias"):
                    rename(f"{src}.{a}.{p}", f"{dst}.{b}.{p}")
        else:
            for p in ("weight", "bias"):
                rename(f"{src}.norm.{p}", f"{dst}.group_norm.{p}")
            if to_diffusers:
                w, b = take(f"{src}.qkv.weight"), take(f"{src}.qkv.bias")
                heads = _heads(adm, kind, w.shape[1])
                for p, t in (("weight", w), ("bias", b)):
                    for name, part in zip(("to_q", "to_k", "to_v"), _split_qkv(t, heads, legacy)):
                        out[f"{dst}.{name}.{p}"] = part
                pw = take(f"{src}.proj_out.weight")
                out[f"{dst}.to_out.0.weight"] = pw.reshape(pw.shape[0], pw.shape[1])
            else:
                for p in ("weight", "bias"):
                    q, k, v = (take(f"{dst}.{n}.{p}") for n in ("to_q", "to_k", "to_v"))
                    out[f"{src}.qkv.{p}"] = _merge_qkv(q, k, v, _heads(adm, kind, q.shape[0]), legacy)
                out[f"{src}.proj_out.weight"] = take(f"{dst}.to_out.0.weight").unsqueeze(-1)
            rename(f"{src}.proj_out.bias", f"{dst}.to_out.0.bias")
    extra = [k for k in sd if k not in used]
    if extra:
        if to_diffusers:
            raise ValueError(f"unexpected key {extra[0]!r} ({len(extra)} unexpected) for the ADM layout")
        raise ValueError(f"unexpected diffusers key {extra[0]!r} ({len(extra)} unexpected)")
    return out


# --------------------------------------------------------------------------------------------------
# recognising ADM checkpoints and inferring their hyper-parameters


class ADMGuessWarning(UserWarning):
    """An ADM hyper-parameter the weights do not determine was guessed."""


def _warn_one_line(message: str) -> None:
    # warnings.warn prints the caller's source line under the message; a "<...>" file has none, so the
    # user sees one line on stderr (and linecache never opens a file to look for it)
    warnings.warn_explicit(message, ADMGuessWarning, "<diffrestore>", 0, module=__name__)


def is_adm_state_dict(sd: Mapping[str, Any]) -> bool:
    """True when the keys look like a bare guided-diffusion ``UNetModel`` state dict."""
    need = ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight", "middle_block.0.in_layers.0.weight")
    return all(k in sd and isinstance(sd[k], torch.Tensor) for k in need)


def _indices(keys: Iterable[str], prefix: str) -> list[int]:
    idx = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                idx.add(int(head))
    return sorted(idx)


def infer_adm_hparams(
    sd: Mapping[str, torch.Tensor], overrides: Mapping[str, Any] | None = None, *, where: str = "the checkpoint"
) -> dict[str, Any]:
    """ADM hyper-parameters (for :func:`adm_config`) read off a state dict's key names and shapes.

    Not recoverable from weights, hence defaults unless given in ``overrides``: ``image_size`` (the size
    whose default ``channel_mult`` matches, else 256; it only names attention levels and ``sample_size``),
    ``use_new_attention_order`` (False) and ``num_head_channels`` (64 when it divides every attention
    width; otherwise the largest power of two <= 64 that does, with an ``ADMGuessWarning`` naming ``where``).
    Raises ``ValueError`` when the keys are not a consistent ADM layout.
    """
    overrides = dict(overrides or {})
    if not is_adm_state_dict(sd):
        raise ValueError("keys are not a guided-diffusion (ADM) UNet state dict")
    keys = list(sd)
    mc = sd["time_embed.0.weight"].shape[1]
    in_ch = sd["input_blocks.0.0.weight"].shape[1]
    out_ch = sd["out.2.weight"].shape[0]
    in_idx = _indices(keys, "input_blocks.")
    out_idx = _indices(keys, "output_blocks.")
    if in_idx != list(range(len(in_idx))) or out_idx != list(range(len(out_idx))) or not out_idx:
        raise ValueError("input/output block indices are not contiguous")

    def subs(block: str) -> list[int]:
        return _indices(keys, block + ".")

    def is_attn(prefix: str) -> bool:
        return f"{prefix}.qkv.weight" in sd

    # output blocks: [res, (attn), (upsampler)]; the first one holding an upsampler ends the top level
    ups = []
    for k in out_idx:
        for s in subs(f"output_blocks.{k}"):
            if s >= 1 and not is_attn(f"output_blocks.{k}.{s}"):
                ups.append(k)
    nrb = ups[0] if ups else len(out_idx) - 1
    if len(out_idx) % (nrb + 1):
        raise ValueError("cannot infer num_res_blocks from the output blocks")
    n_levels = len(out_idx) // (nrb + 1)
    if len(in_idx) != n_levels * (nrb + 1):
        raise ValueError("input and output block counts disagree")
    mult, attn_levels = [], []
    updown = None
    for lvl in range(n_levels):
        first = 1 + lvl * (nrb + 1)
        c = sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]
        mult.append(c / mc)
        attn_levels.append(is_attn(f"input_blocks.{first}.1"))
        if lvl != n_levels - 1:
            down = f"input_blocks.{first + nrb}.0"
            this = f"{down}.in_layers.0.weight" in sd
            if updown is None:
                updown = this
    mult_t = tuple(int(m) if float(m).is_integer() else m for m in mult)
    scale_shift = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * sd[
        "input_blocks.1.0.out_layers.3.weight"
    ].shape[0]
    learn_sigma = out_ch == 2 * in_ch
    class_cond = "label_emb.weight" in sd
    num_classes = sd["label_emb.weight"].shape[0] if class_cond else 1000

    image_size = overrides.get("image_size")
    if image_size is None:
        image_size = next((s for s, m in DEFAULT_CHANNEL_MULT.items() if tuple(m) == mult_t), 256)
    attn_ds = [2**lvl for lvl, a in enumerate(attn_levels) if a]
    attn_widths = [int(mult[lvl] * mc) for lvl, a in enumerate(attn_levels) if a] + [int(mult[-1] * mc)]
    hc = 64
    if "num_head_channels" not in overrides and "num_heads" not in overrides:
        if any(w % 64 for w in attn_widths):
            hc = 64
            while hc > 1 and any(w % hc for w in attn_widths):
                hc //= 2
            _warn_one_line(
                f"ADM head width is not stored in {where}; guessed num_head_channels={hc} "
                f"(override with adm_config={{'num_head_channels': N}}, on the command line "
                f"--adm-config '{{\"num_head_channels\": N}}')"
            )
    hp = dict(
        image_size=int(image_size),
        num_channels=int(mc),
        num_res_blocks=int(nrb),
        channel_mult=",".join(str(m) for m in mult_t),
        attention_resolutions=",".join(str(int(image_size) // d) for d in attn_ds),
        num_heads=4,
        num_head_channels=hc,
        num_heads_upsample=-1,
        learn_sigma=bool(learn_sigma),
        class_cond=bool(class_cond),
        num_classes=int(num_classes),
        resblock_updown=bool(updown) if updown is not None else True,
        use_scale_shift_norm=bool(scale_shift),
        use_new_attention_order=False,
        in_channels=int(in_ch),
        out_channels=int(out_ch // 2 if learn_sigma else out_ch),
    )
    if overrides.get("num_heads") is not None and "num_head_channels" not in overrides:
        hp["num_head_channels"] = -1
    hp.update(overrides)
    return hp
