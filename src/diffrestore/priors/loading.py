"""``load_prior``: turn a ``--prior`` spec into a ``PixelPrior`` or ``LatentSRPrior``.

Accepted specs:

* a guided-diffusion (ADM) state dict (``.pt``; ``.safetensors`` too), e.g. ``256x256_diffusion_uncond.pt``:
  recognised by its keys; hyper-parameters are read off key names and shapes (see
  ``adm.infer_adm_hparams``; pass ``adm_config={...}`` for what weights cannot tell, e.g.
  ``num_head_channels``, ``use_new_attention_order``);
* a diffusers ``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), or a folder
  holding it as ``unet/`` with an optional ``scheduler/scheduler_config.json`` (pipeline layout);
* ``builtin:NAME``: the folder ``src/diffrestore/priors/builtin/NAME/`` (any of the above inside);
* latent SR models (an LDM ``.ckpt``, or a pipeline folder with ``vqvae/`` or ``vae/``) are handed to the
  latent-prior modules by name (see ``_load_latent_sr``).

Every user-caused failure raises ``PriorLoadError`` (a ``ValueError``) with a one-line message that names
the file and what was expected.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from diffrestore.priors import adm as _adm
from diffrestore.priors.base import (
    LatentSRPrior,
    PixelPrior,
    PriorLoadError,
    alphas_cumprod_from_betas,
    linear_betas,
    sqrt_linear_betas,
)
from diffrestore.priors.pixel import UNetPixelPrior

__all__ = ["PriorLoadError", "load_prior", "load_adm_checkpoint", "load_unet_folder", "builtin_dir", "BUILTIN_PREFIX"]

BUILTIN_PREFIX = "builtin:"
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip
_KINDS = {None: None, "pixel": "pixel", "latent": "latent", "latent_sr": "latent", "latent-sr": "latent"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return None if dtype is torch.float32 else dtype
    try:
        d = _DTYPES[str(dtype).lower()]
    except KeyError:
        raise PriorLoadError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16") from None
    return None if d is torch.float32 else d


def builtin_dir() -> Path:
    """Where ``builtin:NAME`` priors live (``src/diffrestore/priors/builtin``)."""
    return Path(__file__).resolve().parent / "builtin"


def load_prior(
    spec: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    kind: str | None = None,
    adm_config: Mapping[str, Any] | None = None,
) -> PixelPrior | LatentSRPrior:
    """Load a prior from a path or ``builtin:NAME``.

    Args:
        spec: path to an ADM ``.pt`` state dict, a diffusers UNet / pipeline folder, an LDM ``.ckpt`` or
            latent SR folder, or ``builtin:NAME``.
        device: where the network goes.
        dtype: network compute dtype (``torch.float16``/``torch.bfloat16`` or "fp16"/"bf16"); eps is float32.
        kind: ``"pixel"`` or ``"latent"`` to insist on one kind (a mismatch raises ``PriorLoadError``).
        adm_config: ADM hyper-parameters overriding what is inferred from an ADM checkpoint's weights.
    """
    if kind not in _KINDS:
        raise PriorLoadError(f"unknown prior kind {kind!r}; use 'pixel' or 'latent'")
    kind = _KINDS[kind]
    dtype = _resolve_dtype(dtype)
    spec = str(spec)
    # ---- HOOK (builtin priors): builtin:NAME -> src/diffrestore/priors/builtin/NAME/ ----------------
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX) :]
        root = builtin_dir()
        path = root / name
        if not name or "/" in name or "\\" in name or name.startswith(".") or not path.is_dir():
            have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise PriorLoadError(
                f"unknown builtin prior {name!r} (available: {', '.join(have) if have else 'none'}; folder {root})"
            )
    else:
        path = Path(spec).expanduser()
    if not path.exists():
        raise PriorLoadError(f"{path}: no such file or folder")
    if path.is_dir():
        return _load_folder(path, device=device, dtype=dtype, kind=kind, adm_overrides=adm_config)
    return _load_file(path, device=device, dtype=dtype, kind=kind, adm_overrides=adm_config)


# --------------------------------------------------------------------------------------------------
# files (.pt / .safetensors / .ckpt)


def _read_checkpoint(path: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped when the file allows it (no copy of a 2 GB file)."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure is a user error here
            raise PriorLoadError(f"{path}: not a readable safetensors file ({_first_line(e)})") from e
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        raise PriorLoadError(f"{path}: cannot read ({e.strerror or e})") from e
    if magic != b"PK" and magic[:1] != b"\x80":  # zip (torch.save) or pickle protocol >= 2 (legacy)
        raise PriorLoadError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) format cannot be mmapped; retry plainly
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        msg = _first_line(e)
        if "Weights only load failed" in msg:
            raise PriorLoadError(
                f"{path}: checkpoint holds Python objects besides tensors; refusing to unpickle it "
                "(expected a plain state dict)"
            ) from e
        raise PriorLoadError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {msg})") from e


def _is_ldm_checkpoint(obj: Any) -> bool:
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        sd = obj if isinstance(obj, dict) else {}
    return any(isinstance(k, str) and k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in sd)


def _unwrap_state_dict(obj: Any) -> Any:
    """Plain state dict, or the one under ``state_dict``/``model``/``ema``; ``module.`` prefixes removed."""
    if isinstance(obj, dict) and not _adm.is_adm_state_dict(obj):
        for key in ("state_dict", "model", "ema", "model_ema"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner:
                obj = inner
                break
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _load_file(path: Path, *, device, dtype, kind, adm_overrides) -> PixelPrior | LatentSRPrior:
    obj = _read_checkpoint(path)
    if not isinstance(obj, dict):
        raise PriorLoadError(f"{path}: checkpoint is a {type(obj).__name__}, expected a state dict")
    if _is_ldm_checkpoint(obj):
        if kind == "pixel":
            raise PriorLoadError(
                f"{path}: latent-diffusion (LDM) checkpoint (model.diffusion_model.*, first_stage_model.* keys), "
                "not a pixel-space ADM state dict"
            )
        del obj
        return _load_latent_sr(path, device=device, dtype=dtype)
    sd = _unwrap_state_dict(obj)
    if not isinstance(sd, dict) or not _adm.is_adm_state_dict(sd):
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
        hp = _adm.infer_adm_hparams(sd, overrides)
        cfg = _adm.adm_config(**hp)
    except (ValueError, TypeError, KeyError) as e:
        raise PriorLoadError(f"{where}: cannot read ADM hyper-parameters ({_first_line(e)})") from e
    model = _adm.build_adm_unet(cfg, device="meta")
    try:
        expected = _adm.convert_diffusers_to_adm_state_dict(model.state_dict(), cfg)
    except ValueError as e:
        raise PriorLoadError(f"{where}: ADM config is inconsistent ({_first_line(e)})") from e
    _check_keys(sd, {k: tuple(v.shape) for k, v in expected.items()}, where, _describe(hp))
    try:
        converted = _adm.convert_adm_state_dict(sd, cfg)
    except ValueError as e:
        raise PriorLoadError(f"{where}: {_first_line(e)}") from e
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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PriorLoadError(f"{path}: cannot read JSON ({_first_line(e)})") from e
    if not isinstance(data, dict):
        raise PriorLoadError(f"{path}: expected a JSON object")
    return data


def _load_folder(path: Path, *, device, dtype, kind, adm_overrides) -> PixelPrior | LatentSRPrior:
    index_path = path / "model_index.json"
    if index_path.is_file():
        index = _read_json(index_path)
        if "vqvae" in index or "vae" in index:
            if kind == "pixel":
                raise PriorLoadError(f"{path}: latent SR model folder (has a first stage), not a pixel-space prior")
            return _load_latent_sr(path, device=device, dtype=dtype)
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
    from diffusers import UNet2DModel

    folder = Path(folder)
    cfg_path = folder / "config.json"
    cfg = _read_json(cfg_path)
    cls_name = cfg.get("_class_name", "UNet2DModel")
    if cls_name != "UNet2DModel":
        raise PriorLoadError(f"{cfg_path}: model class {cls_name!r}, expected UNet2DModel")
    in_ch, out_ch = int(cfg.get("in_channels", 3)), int(cfg.get("out_channels", 3))
    if in_ch != 3 or out_ch not in (3, 6):
        raise PriorLoadError(
            f"{cfg_path}: UNet maps {in_ch} -> {out_ch} channels; a pixel prior maps 3 -> 3 (or 6 with learned "
            "sigma)" + (" - this looks like a latent SR UNet: pass the whole pipeline folder" if in_ch > 3 else "")
        )
    alphas = _alphas_from_scheduler(Path(scheduler_config)) if scheduler_config else None
    if "_adm" in cfg:  # converted ADM with patches UNet2DModel's config cannot express (see adm.py)
        model = _load_adm_unet_folder(folder, cfg)
    else:
        try:
            model, info = UNet2DModel.from_pretrained(
                str(folder), local_files_only=True, output_loading_info=True, low_cpu_mem_usage=False
            )
        except Exception as e:  # noqa: BLE001 - diffusers raises many types for bad folders
            raise PriorLoadError(f"cannot load UNet2DModel from {folder}: {_first_line(e)}") from e
        problems = [f"{len(v)} {k.replace('_', ' ')} (e.g. {sorted(map(str, v))[0]})" for k, v in info.items() if v]
        if problems:
            raise PriorLoadError(f"{folder}: weights do not match config.json: {'; '.join(problems)}")
    return UNetPixelPrior(model.eval(), alphas, dtype=dtype).to(device)


def _load_adm_unet_folder(folder: Path, cfg: dict):
    from safetensors.torch import load_file

    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise PriorLoadError(f"{folder}: no diffusion_pytorch_model.safetensors")
    try:
        sd = load_file(str(weights))
    except Exception as e:  # noqa: BLE001
        raise PriorLoadError(f"{weights}: not a readable safetensors file ({_first_line(e)})") from e
    try:
        model = _adm.build_adm_unet(cfg, device="meta")
    except (ValueError, TypeError, KeyError) as e:
        raise PriorLoadError(f"{folder / 'config.json'}: bad ADM config ({_first_line(e)})") from e
    _check_keys(sd, {k: tuple(v.shape) for k, v in model.state_dict().items()}, str(weights), "config.json")
    model.load_state_dict(_as_float32(sd), strict=True, assign=True)
    return model


def _cosine_betas(steps: int, max_beta: float = 0.999) -> torch.Tensor:
    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - abar((i + 1) / steps) / abar(i / steps), max_beta) for i in range(steps)], dtype=torch.float64
    ).float()


def _alphas_from_scheduler(path: Path) -> torch.Tensor:
    cfg = _read_json(path)
    pred = cfg.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise PriorLoadError(f"{path}: prediction_type {pred!r} is not supported (need epsilon)")
    steps = int(cfg.get("num_train_timesteps", 1000))
    start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    schedule = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64).float()
    elif schedule == "linear":
        betas = linear_betas(start, end, steps)
    elif schedule == "scaled_linear":
        betas = sqrt_linear_betas(start, end, steps)
    elif schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(steps)
    else:
        raise PriorLoadError(f"{path}: beta_schedule {schedule!r} is not supported")
    return alphas_cumprod_from_betas(betas)


# --------------------------------------------------------------------------------------------------
# ---- HOOK (latent SR): LDM .ckpt files and latent pipeline folders are loaded by the latent-prior
# modules, looked up by name at call time so this module works without them:
#   files and folders: diffrestore.priors.ldm.load_latent_sr(path, ...)
#   folders, if ldm is absent: diffrestore.priors.latent.load_diffusers_latent_sr(path, ...)
# Keyword arguments device= / dtype= are passed only when the function accepts them.

_LATENT_LOADERS_FOLDER = (
    ("diffrestore.priors.ldm", "load_latent_sr"),
    ("diffrestore.priors.latent", "load_diffusers_latent_sr"),
)
_LATENT_LOADERS_FILE = (("diffrestore.priors.ldm", "load_latent_sr"), ("diffrestore.priors.latent", "load_latent_sr"))


def _find_loader(candidates):
    for mod_name, fn_name in candidates:
        if importlib.util.find_spec(mod_name) is None:
            continue
        fn = getattr(importlib.import_module(mod_name), fn_name, None)
        if callable(fn):
            return fn
    return None


def _load_latent_sr(path: Path, *, device, dtype) -> LatentSRPrior:
    candidates = _LATENT_LOADERS_FOLDER if path.is_dir() else _LATENT_LOADERS_FILE
    fn = _find_loader(candidates)
    if fn is None:
        names = " or ".join(f"{m}.{f}" for m, f in candidates)
        raise PriorLoadError(f"{path}: latent SR model, but latent SR loading is not available ({names} not found)")
    params = inspect.signature(fn).parameters
    kwargs = {}
    if "dtype" in params:
        kwargs["dtype"] = dtype
    if "device" in params:
        kwargs["device"] = device
    prior = fn(path, **kwargs)
    return prior.to(device)
