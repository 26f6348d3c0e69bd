"""``load_prior``: turn a ``--prior`` spec into a ``PixelPrior`` or ``LatentSRPrior``.

Accepted specs (``catalog.SPEC_FORMATS`` words them for the CLI):

* a guided-diffusion (ADM) state dict (``.pt``; ``.safetensors`` too), e.g. ``256x256_diffusion_uncond.pt``:
  recognised by its keys; hyper-parameters are read off key names and shapes (see
  ``adm_weights.infer_adm_hparams``; pass ``adm_config={...}`` for what weights cannot tell, e.g.
  ``num_head_channels``, ``use_new_attention_order``);
* a diffusers ``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), or a folder
  holding it as ``unet/`` with an optional ``scheduler/scheduler_config.json`` (pipeline layout);
* a latent SR model: an LDM ``.ckpt`` + YAML (``ldm.load_latent_sr``; Lightning checkpoints that pickle
  callbacks or optimizer state too are read with a tensor-only unpickler, once), or a pipeline folder with
  ``vqvae/`` or ``vae/`` (``latent.load_diffusers_latent_sr``);
* ``builtin:NAME``: the folder ``src/diffrestore/priors/builtin/NAME/`` (any of the above inside).

Every user-caused failure raises ``PriorLoadError`` (a ``ValueError``) with a one-line message that names
the file and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import UNet2DModel

from diffrestore.runtime import auto_dtype

from . import adm as _adm
from . import adm_weights as _adm_weights
from ._files import first_line, from_pretrained, load_weights, read_json, resolve_dtype, tensor_state_dict
from .base import LatentSRPrior, PixelPrior, PriorLoadError, scheduler_alphas_cumprod
from .catalog import BUILTIN_PREFIX, builtin_dir, require_weights, resolve_spec
from .frozen import frozen_graphs_pay_off
from .latent import load_diffusers_latent_sr
from .ldm import load_latent_sr
from .pixel import UNetPixelPrior

__all__ = ["PriorLoadError", "load_prior", "load_adm_checkpoint", "load_unet_folder", "builtin_dir", "BUILTIN_PREFIX"]

_KINDS = {None: None, "pixel": "pixel", "latent": "latent", "latent_sr": "latent", "latent-sr": "latent"}


def load_prior(
    spec: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    kind: str | None = None,
    adm_config: Mapping[str, Any] | None = None,
    frozen_graphs: bool = False,
    channels_last: bool | None = None,
) -> PixelPrior | LatentSRPrior:
    """Load a prior from a path or ``builtin:NAME``.

    Args:
        spec: path to an ADM ``.pt`` state dict, a diffusers UNet / pipeline folder, an LDM ``.ckpt`` or
            latent SR folder, or ``builtin:NAME``.
        device: where the network goes.
        dtype: network compute dtype (``torch.float16``/``torch.bfloat16`` or "fp16"/"bf16"; "auto": bf16 where
            ``device`` computes it natively, see ``diffrestore.runtime.auto_dtype``); eps is float32. The
            default, None, keeps the stored float32 weights, so results match float32 references exactly.
        kind: ``"pixel"`` or ``"latent"`` to insist on one kind (a mismatch raises ``PriorLoadError``).
        adm_config: ADM hyper-parameters overriding what is inferred from an ADM checkpoint's weights
            (e.g. ``{"num_head_channels": 32}``; the CLI's ``--adm-config``).
        frozen_graphs: run the network as frozen TorchScript graphs (``priors.frozen``; the CLI's
            ``--frozen-graphs``), traced once per input size, where that is faster (``frozen_graphs_pay_off``:
            not a pixel prior in float32 on a CPU, which stays eager).
        channels_last: keep the UNet in channels-last memory format (``use_channels_last``: faster on a CPU,
            results differ by float rounding); None: as the environment variable ``DIFFRESTORE_CHANNELS_LAST=1``
            says (how the CLI turns it on), else off.
    """
    if kind not in _KINDS:
        raise PriorLoadError(f"unknown prior kind {kind!r}; use 'pixel' or 'latent'")
    kind = _KINDS[kind]
    if isinstance(dtype, str) and dtype.lower() == "auto":
        dtype = None if auto_dtype(device) == "fp32" else auto_dtype(device)
    dtype = resolve_dtype(dtype)
    path = resolve_spec(spec)
    if not path.exists():
        raise PriorLoadError(f"{path}: no such file or folder")
    load = _load_folder if path.is_dir() else _load_file
    prior = load(path, device=device, dtype=dtype, kind=kind, adm_overrides=adm_config)
    if channels_last if channels_last is not None else os.environ.get("DIFFRESTORE_CHANNELS_LAST", "") == "1":
        prior.use_channels_last()
    return prior.use_frozen_graphs() if frozen_graphs and frozen_graphs_pay_off(prior) else prior


# --------------------------------------------------------------------------------------------------
# files (.pt / .safetensors / .ckpt)


def _is_ldm_checkpoint(obj: Any) -> bool:
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        sd = obj if isinstance(obj, dict) else {}
    return any(isinstance(k, str) and k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in sd)


def _unwrap_state_dict(obj: Any) -> Any:
    """Plain state dict, or the one under ``state_dict``/``model``/``ema``; ``module.`` prefixes removed."""
    if isinstance(obj, dict) and not _adm_weights.is_adm_state_dict(obj):
        for key in ("state_dict", "model", "ema", "model_ema"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner:
                obj = inner
                break
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _load_file(path: Path, *, device, dtype, kind, adm_overrides) -> PixelPrior | LatentSRPrior:
    obj = load_weights(path)  # the only read: an LDM checkpoint's tensors go on to the LDM loader
    if not isinstance(obj, dict):
        raise PriorLoadError(f"{path}: checkpoint is a {type(obj).__name__}, expected a state dict")
    if _is_ldm_checkpoint(obj):
        if kind == "pixel":
            raise PriorLoadError(
                f"{path}: latent-diffusion (LDM) checkpoint (model.diffusion_model.*, first_stage_model.* keys), "
                "not a pixel-space ADM state dict"
            )
        return load_latent_sr(path, state_dict=tensor_state_dict(obj, path), dtype=dtype).to(device)
    sd = _unwrap_state_dict(obj)
    if not isinstance(sd, dict) or not _adm_weights.is_adm_state_dict(sd):
        keys = [str(k) for k in (sd if isinstance(sd, dict) else {})][:3]
        raise PriorLoadError(
            f"{path}: not a guided-diffusion (ADM) UNet state dict (keys {keys}...; expected time_embed.*, "
            "input_blocks.*, middle_block.*, output_blocks.*, out.*)"
        )
    if kind == "latent":
        raise PriorLoadError(f"{path}: pixel-space ADM state dict, not a latent SR model")
    return load_adm_checkpoint(sd, where=str(path), device=device, dtype=dtype, overrides=adm_overrides)


def load_adm_checkpoint(
    sd: Mapping[str, torch.Tensor],
    *,
    where: str = "state dict",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    overrides: Mapping[str, Any] | None = None,
    alphas_cumprod: torch.Tensor | None = None,
) -> UNetPixelPrior:
    """ADM state dict -> ``UNetPixelPrior`` (model built on ``meta``, weights assigned without a copy)."""
    try:
        hp = _adm_weights.infer_adm_hparams(sd, overrides, where=where)
        cfg = _adm.adm_config(**hp)
    except (ValueError, TypeError, KeyError) as e:
        raise PriorLoadError(f"{where}: cannot read ADM hyper-parameters ({first_line(e)})") from e
    model = _adm.build_adm_unet(cfg, device="meta")
    try:
        expected = _adm_weights.convert_diffusers_to_adm_state_dict(model.state_dict(), cfg)
    except ValueError as e:
        raise PriorLoadError(f"{where}: ADM config is inconsistent ({first_line(e)})") from e
    _check_keys(sd, {k: tuple(v.shape) for k, v in expected.items()}, where, _describe(hp))
    try:
        converted = _adm_weights.convert_adm_state_dict(sd, cfg)
    except ValueError as e:
        raise PriorLoadError(f"{where}: {first_line(e)}") from e
    model.load_state_dict(_as_float32(converted), strict=True, assign=True)
    return UNetPixelPrior(model.eval(), alphas_cumprod, dtype=dtype).to(device)


def _as_float32(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``assign=True`` keeps the stored dtype: bring half-precision checkpoints to float32 (no-op for fp32)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _describe(hp: Mapping[str, Any]) -> str:
    keys = ("num_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_head_channels")
    return "inferred ADM config " + ", ".join(f"{k}={hp[k]}" for k in keys if k in hp)


def _check_keys(sd: Mapping[str, Any], expected: Mapping[str, tuple], where: str, what: str) -> None:
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        raise PriorLoadError(f"{where}: missing {len(missing)} tensor(s), e.g. {missing[0]!r} ({what})")
    if unexpected:
        raise PriorLoadError(f"{where}: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]!r} ({what})")
    for k, shape in expected.items():
        t = sd[k]
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        if got != shape:
            raise PriorLoadError(f"{where}: tensor {k!r} has shape {got}, expected {shape} ({what})")


# --------------------------------------------------------------------------------------------------
# folders


def _load_folder(path: Path, *, device, dtype, kind, adm_overrides) -> PixelPrior | LatentSRPrior:
    index_path = path / "model_index.json"
    if index_path.is_file():
        index = read_json(index_path)
        if "vqvae" in index or "vae" in index:
            if kind == "pixel":
                raise PriorLoadError(f"{path}: latent SR model folder (has a first stage), not a pixel-space prior")
            return load_diffusers_latent_sr(path, dtype=dtype).to(device)
    if (path / "unet" / "config.json").is_file():
        unet_dir, sched = path / "unet", path / "scheduler" / "scheduler_config.json"
    elif (path / "config.json").is_file():
        unet_dir = path
        sched = next(
            (p for p in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json",
                         path.parent / "scheduler" / "scheduler_config.json") if p.is_file()),  # fmt: skip
            path / "scheduler_config.json",
        )
    else:
        pts = sorted(path.glob("*.pt")) + sorted(path.glob("*.ckpt"))
        if len(pts) == 1:  # a folder holding one checkpoint (e.g. a builtin prior)
            return _load_file(pts[0], device=device, dtype=dtype, kind=kind, adm_overrides=adm_overrides)
        raise PriorLoadError(
            f"{path}: not a model folder (expected config.json + diffusion_pytorch_model.safetensors, "
            "unet/config.json, or model_index.json)"
        )
    if kind == "latent":
        raise PriorLoadError(f"{path}: pixel-space UNet folder, not a latent SR model")
    return load_unet_folder(unet_dir, sched if sched.is_file() else None, device=device, dtype=dtype)


def load_unet_folder(
    folder: str | Path,
    scheduler_config: str | Path | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> UNetPixelPrior:
    """A diffusers ``UNet2DModel`` folder (+ optional ``scheduler_config.json``) -> ``UNetPixelPrior``."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    cfg = read_json(cfg_path)
    cls_name = cfg.get("_class_name", "UNet2DModel")
    if cls_name != "UNet2DModel":
        raise PriorLoadError(f"{cfg_path}: model class {cls_name!r}, expected UNet2DModel")
    in_ch, out_ch = int(cfg.get("in_channels", 3)), int(cfg.get("out_channels", 3))
    if in_ch != 3 or out_ch not in (3, 6):
        raise PriorLoadError(
            f"{cfg_path}: UNet maps {in_ch} -> {out_ch} channels; a pixel prior maps 3 -> 3 (or 6 with learned "
            "sigma)" + (" - this looks like a latent SR UNet: pass the whole pipeline folder" if in_ch > 3 else "")
        )
    alphas = None
    if scheduler_config:
        alphas = scheduler_alphas_cumprod(read_json(Path(scheduler_config)), str(scheduler_config))
    if "_adm" in cfg:  # converted ADM with patches UNet2DModel's config cannot express (see adm.py)
        model = _load_adm_unet_folder(folder, cfg)
    else:
        require_weights(folder)
        model = from_pretrained(UNet2DModel, folder)
    return UNetPixelPrior(model.eval(), alphas, dtype=dtype).to(device)


def _load_adm_unet_folder(folder: Path, cfg: dict):
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise PriorLoadError(f"{folder}: no diffusion_pytorch_model.safetensors")
    sd = load_weights(weights)
    try:
        model = _adm.build_adm_unet(cfg, device="meta")
    except (ValueError, TypeError, KeyError) as e:
        raise PriorLoadError(f"{folder / 'config.json'}: bad ADM config ({first_line(e)})") from e
    _check_keys(sd, {k: tuple(v.shape) for k, v in model.state_dict().items()}, str(weights), "config.json")
    model.load_state_dict(_as_float32(sd), strict=True, assign=True)
    return model
