"""Load an LDM super-resolution model: a diffusers folder, or an original LDM ``.ckpt`` + YAML converted
in memory to diffusers ``UNet2DModel`` + ``VQModel``.

Entry point: ``load_latent_sr(path, config=None)``.

Original checkpoints (CompVis/latent-diffusion ``LatentDiffusion``, e.g. ``models/ldm/bsr_sr``):

* ``state_dict`` keys ``model.diffusion_model.*`` (the openaimodel UNet), ``first_stage_model.*``
  (``VQModelInterface``), optionally ``model_ema.*`` (LitEma: one buffer per UNet parameter with the dots
  removed) and the schedule buffers (``alphas_cumprod`` ...);
* the YAML (``model.params``) gives the architecture. It is found as ``config=``, else ``<stem>.yaml``
  beside the checkpoint, else ``config.yaml`` beside it (the layout of the official downloads).

EMA: the official sampling code runs inside ``model.ema_scope()`` (e.g. the SR notebook's
``make_convolutional_sample``), which swaps the EMA weights in whenever the config's ``use_ema`` is true
(LDM's default). So by default (``use_ema=None``) we take the ``model_ema.*`` weights when the YAML says
``use_ema`` (or leaves it out) and the checkpoint carries them; when it carries none we fall back to the
raw weights (the official code would then swap in LitEma's buffers as initialised at construction,
a copy of the random init, which no author can have meant). ``use_ema=True``/``False`` forces the choice;
``True`` on a checkpoint without EMA weights is an error.

Supported: eps-parameterised ``LatentDiffusion`` with ``conditioning_key`` ``concat`` and an Identity
conditioning stage, an openaimodel UNet without cross-attention / scale-shift norm / resblock up-down
(legacy attention order, as LDM's default), a ``VQModelInterface`` first stage without attention inside its
levels. Anything else, and any checkpoint key that the YAML does not account for (missing, unexpected or of
another shape), raises ``PriorLoadError`` with a one-line message.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from diffusers import UNet2DModel, VQModel

from ._files import first_line, read_state_dict, read_yaml
from .base import PriorLoadError, ldm_alphas_cumprod
from .latent import DiffusersLatentSRPrior, load_diffusers_latent_sr

__all__ = ["convert_ldm_sr", "load_latent_sr", "read_state_dict", "unet_config_from_ldm", "vq_config_from_ldm"]

UNET_PREFIX = "model.diffusion_model."
VQ_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
_EMA_META = {"decay", "num_updates"}


def load_latent_sr(
    path: str | Path,
    config: str | Path | dict | None = None,
    *,
    use_ema: bool | None = None,
    dtype: torch.dtype | str | None = None,
    quantize_on_decode: bool = True,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> DiffusersLatentSRPrior:
    """A latent SR prior from a diffusers folder (hub layout) or an original LDM checkpoint + YAML.

    ``state_dict``: the checkpoint's tensors when the caller has read ``path`` already (``load_prior``
    reads a file once to tell what it is; a real checkpoint is GBs).
    """
    p = Path(path)
    if p.is_dir():
        if config is not None:
            raise PriorLoadError(f"{p}: config= only applies to .ckpt files; a folder carries its own configs")
        return load_diffusers_latent_sr(p, dtype=dtype, quantize_on_decode=quantize_on_decode)
    if not p.is_file():
        raise PriorLoadError(f"{p}: no such file or folder")
    cfg = config if isinstance(config, dict) else read_yaml(_find_yaml(p, config), _YAML_EXPECTED)
    if state_dict is None:
        state_dict = read_state_dict(p)
    unet, vq, alphas_cumprod, scale = convert_ldm_sr(state_dict, cfg, use_ema=use_ema, where=str(p))
    return DiffusersLatentSRPrior(
        unet, vq, alphas_cumprod, latent_scale=scale, quantize_on_decode=quantize_on_decode, dtype=dtype
    )


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def _find_yaml(ckpt: Path, config) -> Path:
    if config is not None:
        c = Path(config)
        if not c.is_file():
            raise PriorLoadError(f"{c}: config file not found")
        return c
    for c in (ckpt.with_suffix(".yaml"), ckpt.with_suffix(".yml"), ckpt.parent / "config.yaml"):
        if c.is_file():
            return c
    raise PriorLoadError(
        f"{ckpt}: no YAML config found; put the model's config beside it as {ckpt.stem}.yaml or config.yaml"
    )


_YAML_EXPECTED = "an LDM config (a mapping with a model: section)"


# ---------------------------------------------------------------------------------------------
# YAML -> diffusers configs
# ---------------------------------------------------------------------------------------------


def _target_is(section, *names: str) -> bool:
    target = section.get("target", "") if isinstance(section, dict) else str(section)
    return any(target == n or target.endswith("." + n) for n in names)


def _unsupported(where: str, what: str):
    return PriorLoadError(f"{where}: unsupported LDM config: {what}")


def ldm_model_params(cfg: dict, where: str = "config") -> dict:
    """``model.params`` of a latent SR ``LatentDiffusion`` config, checked."""
    model = cfg.get("model")
    if not isinstance(model, dict) or not _target_is(model, "LatentDiffusion"):
        raise PriorLoadError(f"{where}: not a LatentDiffusion config (model.target must be LatentDiffusion)")
    params = model.get("params") or {}
    for key in ("unet_config", "first_stage_config"):
        if not isinstance(params.get(key), dict):
            raise PriorLoadError(f"{where}: LatentDiffusion config without {key}")
    cond = params.get("cond_stage_config")
    if cond == "__is_unconditional__" or not _target_is(cond or {}, "torch.nn.Identity", "Identity"):
        raise PriorLoadError(f"{where}: not a latent SR model (cond_stage_config must be torch.nn.Identity)")
    key = params.get("conditioning_key") or ("concat" if params.get("concat_mode", True) else "crossattn")
    if key != "concat":
        raise PriorLoadError(f"{where}: not a latent SR model (conditioning_key {key!r}, need concat)")
    if params.get("parameterization", "eps") != "eps":
        raise _unsupported(where, f"parameterization {params['parameterization']!r} (need eps)")
    return params


def unet_config_from_ldm(p: dict, where: str = "config") -> dict:
    """diffusers ``UNet2DModel`` config of an openaimodel ``UNetModel`` (its YAML ``params``)."""
    for flag in ("use_spatial_transformer", "use_scale_shift_norm", "resblock_updown", "use_new_attention_order"):
        if p.get(flag):
            raise _unsupported(where, f"UNet {flag}: true")
    for key in ("context_dim", "num_classes", "n_embed"):
        if p.get(key) is not None:
            raise _unsupported(where, f"UNet {key}")
    if not p.get("conv_resample", True) or p.get("dims", 2) != 2 or not p.get("legacy", True):
        raise _unsupported(where, "UNet conv_resample false, dims != 2 or legacy false")
    mc = int(p["model_channels"])
    mult = [int(m) for m in p.get("channel_mult", (1, 2, 4, 8))]
    nrb = p["num_res_blocks"]
    if isinstance(nrb, (list, tuple)):
        if len(set(nrb)) != 1:
            raise _unsupported(where, "per-level num_res_blocks")
        nrb = nrb[0]
    if mult[0] != 1:
        raise _unsupported(where, "UNet channel_mult not starting with 1")
    attn = {int(a) for a in p.get("attention_resolutions", ())}
    n = len(mult)
    levels = [2**L in attn for L in range(n)]
    chans = [mc * m for m in mult]
    # head size of every attention block (down levels, middle, up levels), as openaimodel computes it
    nh, nhc = int(p.get("num_heads", -1)), int(p.get("num_head_channels", -1))
    nh_up = int(p.get("num_heads_upsample", -1))
    nh_up = nh if nh_up == -1 else nh_up
    if nhc == -1 and nh <= 0:
        raise PriorLoadError(f"{where}: UNet needs num_heads or num_head_channels")
    blocks = [(c, nh) for c, a in zip(chans, levels) if a] + [(chans[-1], nh)]
    blocks += [(c, nh_up) for c, a in zip(chans, levels) if a]
    head_dims = {nhc if nhc != -1 else c // heads for c, heads in blocks}
    if len(head_dims) != 1 or any(c % next(iter(head_dims)) for c, _ in blocks):
        raise _unsupported(where, f"attention head sizes {sorted(head_dims)} differ between levels")
    return {
        "sample_size": p.get("image_size"),
        "in_channels": int(p["in_channels"]),
        "out_channels": int(p["out_channels"]),
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": 0,
        "flip_sin_to_cos": True,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in levels],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)],
        "block_out_channels": chans,
        "layers_per_block": int(nrb),
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "act_fn": "silu",
        "attention_head_dim": head_dims.pop(),
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
    }


def vq_config_from_ldm(p: dict, where: str = "config") -> dict:
    """diffusers ``VQModel`` config of a taming/LDM ``VQModelInterface`` (its YAML ``params``)."""
    dd = p.get("ddconfig") or {}
    if dd.get("double_z"):
        raise _unsupported(where, "first stage double_z: true")
    if dd.get("attn_resolutions"):
        raise _unsupported(where, "first stage attn_resolutions (attention inside the VQ levels)")
    if dd.get("attn_type", "vanilla") != "vanilla" or dd.get("give_pre_end") or dd.get("tanh_out"):
        raise _unsupported(where, "first stage attn_type / give_pre_end / tanh_out")
    if not dd.get("resamp_with_conv", True):
        raise _unsupported(where, "first stage resamp_with_conv: false")
    ch_mult = [int(m) for m in dd.get("ch_mult", (1, 2, 4, 8))]
    if ch_mult[0] != 1:
        raise _unsupported(where, "first stage ch_mult not starting with 1")
    n = len(ch_mult)
    z, embed = int(dd["z_channels"]), int(p["embed_dim"])
    return {
        "in_channels": int(dd.get("in_channels", 3)),
        "out_channels": int(dd.get("out_ch", 3)),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [int(dd["ch"]) * m for m in ch_mult],
        "layers_per_block": int(dd["num_res_blocks"]),
        "act_fn": "silu",
        "latent_channels": z,
        "sample_size": int(dd.get("resolution", 256)),
        "num_vq_embeddings": int(p["n_embed"]),
        "norm_num_groups": 32,
        "vq_embed_dim": None if embed == z else embed,
    }


_LDM_TO_DIFFUSERS_SCHEDULE = {"linear": "scaled_linear", "sqrt_linear": "linear"}


def _schedule(params: dict, sd: dict, where: str) -> torch.Tensor:
    name = params.get("beta_schedule", "linear")
    if name not in _LDM_TO_DIFFUSERS_SCHEDULE:
        raise _unsupported(where, f"beta_schedule {name!r}")
    ac = ldm_alphas_cumprod(
        float(params.get("linear_start", 1e-4)),
        float(params.get("linear_end", 2e-2)),
        int(params.get("timesteps", 1000)),
        _LDM_TO_DIFFUSERS_SCHEDULE[name],
    )
    stored = sd.get("alphas_cumprod")
    if stored is not None and (stored.shape != ac.shape or (stored.float() - ac).abs().max() > 1e-6):
        raise PriorLoadError(f"{where}: the checkpoint's alphas_cumprod does not match the YAML schedule")
    return ac


# ---------------------------------------------------------------------------------------------
# key mapping (diffusers name -> original name + tensor transform)
# ---------------------------------------------------------------------------------------------


def _linear_from_conv(t):
    """Conv1d / 1x1 Conv2d weight -> Linear weight (biases pass through)."""
    if t.ndim == 1:
        return t
    if t.ndim >= 2 and all(s == 1 for s in t.shape[2:]):
        return t.reshape(t.shape[0], t.shape[1])
    return None


def _qkv_part(i: int, head_dim: int):
    """Slice q (0), k (1) or v (2) out of a legacy ``qkv`` conv, packed per head as (heads, [q,k,v], ch)."""

    def take(t):
        c = t.shape[0] // 3
        if t.shape[0] != 3 * c or c % head_dim or (t.ndim > 1 and (t.shape[1] != c or t[0].numel() != c)):
            return None
        heads = c // head_dim
        if t.ndim == 1:
            return t.reshape(heads, 3, head_dim)[:, i].reshape(c).contiguous()
        return t.reshape(heads, 3, head_dim, c)[:, i].reshape(c, c).contiguous()

    return take


_UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_VQ_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}


def _resnet(names: dict, sub: str):
    mod, param = sub.rsplit(".", 1)
    return f"{names[mod]}.{param}", None


def _unet_attention(sub: str, head_dim: int):
    mod, param = sub.rsplit(".", 1)
    if mod == "group_norm":
        return f"norm.{param}", None
    if mod in ("to_q", "to_k", "to_v"):
        return f"qkv.{param}", _qkv_part("qkv".index(mod[-1]), head_dim)
    if mod == "to_out.0":
        return f"proj_out.{param}", _linear_from_conv
    raise KeyError(sub)


def _vq_attention(sub: str):
    mod, param = sub.rsplit(".", 1)
    names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    return f"{names[mod]}.{param}", (None if mod == "group_norm" else _linear_from_conv)


#: a diffusers block parameter: (side, level, kind, index, rest), e.g. ``down_blocks.1.resnets.0.conv1.weight``
_BLOCK_KEY = re.compile(r"(down|up|mid)_blocks?\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")



def _block_parts(name: str, key: str) -> tuple[str, int | None, str, int, str]:
    """(side, level, kind, index, rest) of a block parameter ``name`` (level None in the mid block);
    KeyError(key) for any other name."""
    m = _BLOCK_KEY.fullmatch(name)
    if not m:
        raise KeyError(key)
    side, lvl, kind, j, sub = m.groups()
    return side, None if lvl is None else int(lvl), kind, int(j), sub


def unet_key_map(cfg: dict):
    """``f(diffusers_key) -> (original_key, transform or None)`` for a ``UNet2DModel`` config."""
    nrb, hd = cfg["layers_per_block"], cfg["attention_head_dim"]
    up_attn = [t.startswith("Attn") for t in cfg["up_block_types"]]
    per_level = nrb + 1
    side_name = {"down": "input_blocks", "up": "output_blocks"}

    def f(key: str):
        if key.startswith("conv_in."):
            return "input_blocks.0.0." + key[len("conv_in."):], None
        if key.startswith("time_embedding.linear_"):
            i, param = re.fullmatch(r"time_embedding\.linear_(\d)\.(\w+)", key).groups()
            return f"time_embed.{2 * (int(i) - 1)}.{param}", None
        if key.startswith("conv_norm_out."):
            return "out.0." + key.split(".", 1)[1], None
        if key.startswith("conv_out."):
            return "out.2." + key.split(".", 1)[1], None
        side, lvl, kind, j, sub = _block_parts(key, key)
        if side == "mid":
            if kind == "resnets":
                return f"middle_block.{2 * j}." + _resnet(_UNET_RESNET, sub)[0], None
            k, t = _unet_attention(sub, hd)
            return "middle_block.1." + k, t
        block = 1 + lvl * per_level if side == "down" else lvl * per_level
        if kind == "resnets":
            return f"{side_name[side]}.{block + j}.0." + _resnet(_UNET_RESNET, sub)[0], None
        if kind == "attentions":
            k, t = _unet_attention(sub, hd)
            return f"{side_name[side]}.{block + j}.1." + k, t
        if kind == "downsamplers":
            return f"input_blocks.{block + nrb}.0.op." + sub.split(".", 1)[1], None
        return f"output_blocks.{block + nrb}.{2 if up_attn[lvl] else 1}.conv." + sub.split(".", 1)[1], None

    return f


def vq_key_map(cfg: dict):
    """``f(diffusers_key) -> (original_key, transform or None)`` for a ``VQModel`` config."""
    n = len(cfg["block_out_channels"])

    def f(key: str):
        if key.startswith(("quant_conv.", "post_quant_conv.", "quantize.")):
            return key, None
        part, rest = key.split(".", 1)
        if rest.startswith(("conv_in.", "conv_out.")):
            return key, None
        if rest.startswith("conv_norm_out."):
            return f"{part}.norm_out." + rest.split(".", 1)[1], None
        side, lvl, kind, j, sub = _block_parts(rest, key)
        if side == "mid":
            if kind == "resnets":
                return f"{part}.mid.block_{j + 1}." + _resnet(_VQ_RESNET, sub)[0], None
            k, t = _vq_attention(sub)
            return f"{part}.mid.attn_1." + k, t
        lvl = lvl if side == "down" else n - 1 - lvl  # decoder up[L] is diffusers up_blocks[n-1-L]
        if kind == "resnets":
            return f"{part}.{side}.{lvl}.block.{j}." + _resnet(_VQ_RESNET, sub)[0], None
        resample = "downsample" if kind == "downsamplers" else "upsample"
        return f"{part}.{side}.{lvl}.{resample}.conv." + sub.split(".", 1)[1], None

    return f


def _build(cls, config: dict, original: dict[str, torch.Tensor], key_map, where: str, what: str):
    """Instantiate ``cls(**config)`` without initialising weights and fill it from ``original`` (keys
    without prefix) through ``key_map``; every original key must be used and every shape must fit."""
    with torch.device("meta"):
        model = cls(**config)
    targets: dict[str, list] = {}
    for dkey, param in model.state_dict().items():
        okey, transform = key_map(dkey)
        targets.setdefault(okey, []).append((dkey, transform, tuple(param.shape)))
    missing = sorted(set(targets) - set(original))
    unexpected = sorted(set(original) - set(targets))
    if missing or unexpected:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
        raise PriorLoadError(f"{where}: {what} weights do not match the YAML: {', '.join(parts)}")
    converted = {}
    for okey, uses in targets.items():
        t = original[okey]
        for dkey, transform, shape in uses:
            v = transform(t) if transform is not None else t
            if v is None or tuple(v.shape) != shape:
                raise PriorLoadError(
                    f"{where}: {what} weight {okey} has shape {tuple(t.shape)}, which does not fit the YAML "
                    f"architecture ({dkey} {shape})"
                )
            converted[dkey] = v.float()
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def _unet_weights(sd: dict, params: dict, use_ema: bool | None, where: str) -> dict[str, torch.Tensor]:
    raw = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    ema = {k[len(EMA_PREFIX):]: v for k, v in sd.items() if k.startswith(EMA_PREFIX)}
    ema = {k: v for k, v in ema.items() if k not in _EMA_META}
    if use_ema is None:
        use_ema = bool(params.get("use_ema", True)) and bool(ema)
    if not use_ema:
        return raw
    if not ema:
        raise PriorLoadError(f"{where}: use_ema requested but the checkpoint has no model_ema.* weights")
    # LitEma names a shadow buffer after the DiffusionWrapper parameter name with the dots removed
    names = {("diffusion_model." + k).replace(".", ""): k for k in raw}
    if len(names) != len(raw) or set(names) != set(ema):
        raise PriorLoadError(f"{where}: the model_ema.* weights do not match the model.diffusion_model.* weights")
    return {k: ema[name] for name, k in names.items()}


def convert_ldm_sr(
    state_dict: dict[str, torch.Tensor], cfg: dict, *, use_ema: bool | None = None, where: str = "checkpoint"
) -> tuple[UNet2DModel, VQModel, torch.Tensor, float]:
    """(unet, vqvae, alphas_cumprod, latent_scale) from an LDM-SR state dict and its parsed YAML."""
    params = ldm_model_params(cfg, where)
    unet_params = params["unet_config"].get("params") or {}
    fs = params["first_stage_config"]
    if not _target_is(params["unet_config"], "UNetModel"):
        raise _unsupported(where, f"unet_config target {params['unet_config'].get('target')!r}")
    if not _target_is(fs, "VQModelInterface"):
        raise _unsupported(where, f"first stage {fs.get('target')!r} (only VQModelInterface)")
    try:
        unet_cfg = unet_config_from_ldm(unet_params, where)
        vq_cfg = vq_config_from_ldm(fs.get("params") or {}, where)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, PriorLoadError):
            raise
        raise PriorLoadError(f"{where}: incomplete LDM config ({type(e).__name__}: {first_line(e)})") from e
    unet = _build(UNet2DModel, unet_cfg, _unet_weights(state_dict, params, use_ema, where),
                  unet_key_map(unet_cfg), where, "UNet")
    vq_sd = {
        k[len(VQ_PREFIX):]: v
        for k, v in state_dict.items()
        if k.startswith(VQ_PREFIX) and not k.startswith(VQ_PREFIX + "loss.")
    }
    vq = _build(VQModel, vq_cfg, vq_sd, vq_key_map(vq_cfg), where, "first stage")
    scale = state_dict.get("scale_factor")
    scale = float(scale) if scale is not None else float(params.get("scale_factor", 1.0))
    return unet, vq, _schedule(params, state_dict, where), scale
