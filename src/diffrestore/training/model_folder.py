"""Writing model folders (diffusers layout): fp16 safetensors, configs, recipes and README, each file atomic
and world-readable; the latent-SR folder's index, scheduler config and README."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

from torch import nn

from ..image_io import atomic_write_bytes
from ..image_io import atomic_write_json as _atomic_write_json
from ..image_io import atomic_write_text as _atomic_write_text

LDM_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0015,
    "beta_end": 0.0155,
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def write_model_text(path, text: str) -> None:
    """Atomic text write, world-readable (files shipped in model folders)."""
    _atomic_write_text(path, text)
    os.chmod(path, 0o644)


def write_model_json(path, obj) -> None:
    _atomic_write_json(path, obj)
    os.chmod(path, 0o644)


def save_diffusers_fp16(model: nn.Module, folder: str | os.PathLike) -> None:
    """Write ``model`` (a diffusers ModelMixin) in fp16 safetensors into ``folder``, file by file atomically.

    The model is saved to a hidden temporary folder beside ``folder`` first; each file is then renamed
    into place, so a reader never sees a truncated weight file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to("cpu").half()
    tmp = folder.parent / f".{folder.name}.export-{os.getpid()}"
    if tmp.exists():
        _rmtree(tmp)
    try:
        half.save_pretrained(tmp, safe_serialization=True)
        for f in sorted(tmp.iterdir()):
            os.chmod(f, 0o644)
            os.replace(f, folder / f.name)
    finally:
        if tmp.exists():
            _rmtree(tmp)


def _rmtree(p: Path) -> None:
    for f in p.iterdir():
        if f.is_dir():
            _rmtree(f)
        else:
            f.unlink()
    p.rmdir()


def fmt_hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_ldm_meta(out_dir: Path, prediction: str = "epsilon") -> None:
    """model_index.json and scheduler/scheduler_config.json of the hub layout."""
    import diffusers

    out_dir.mkdir(parents=True, exist_ok=True)
    write_model_json(
        out_dir / "model_index.json",
        {
            "_class_name": "LDMSuperResolutionPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "DDIMScheduler"],
            "unet": ["diffusers", "UNet2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    (out_dir / "scheduler").mkdir(exist_ok=True)
    write_model_json(
        out_dir / "scheduler" / "scheduler_config.json",
        {**LDM_SCHEDULER, "prediction_type": prediction, "_diffusers_version": diffusers.__version__},
    )


def write_ldm_readme(out_dir: Path) -> None:
    """README.md from the recipe records of the two stages (``vae/recipe.json``, ``unet/recipe.json``)."""
    parts = [
        f"# {out_dir.name}: built-in latent super-resolution prior (x4)\n",
        "LDM-SR style model in the diffusers hub layout, trained from scratch by",
        "`diffrestore.training.latent_sr`: `vae/` (AutoencoderKL, f4, 3 latent channels), `unet/`",
        "(UNet2DModel on `cat([z_t, lr], 1)`: latent first, then the RGB low-resolution image in [-1, 1] at",
        "latent resolution), `scheduler/` (DDIM config of the LDM schedule: betas linear in sqrt from",
        "0.0015 to 0.0155, 1000 steps). Weights are EMA weights in fp16 safetensors.\n",
        "**Latent scale**: `encode` = posterior mean, already normalised to zero mean / unit std per",
        "channel (the statistics are folded into `quant_conv` / `post_quant_conv`), `scaling_factor` = 1.0:",
        "use the latent as is, no extra scale factor.\n",
    ]
    for stage in ("vae", "unet"):
        rp = out_dir / stage / "recipe.json"
        if rp.is_file():
            r = json.loads(rp.read_text())
            parts.append(f"## {stage}\n")
            for k, v in r.items():
                parts.append(f"* {k}: {v}")
            parts.append("")
        else:
            parts.append(f"## {stage}\n\n(not trained yet)\n")
    write_model_text(out_dir / "README.md", "\n".join(parts) + "\n")


def describe_data(n_photos: int, data_dir, holdout_every: int, crop: int, short_side, encoded_sides=None) -> str:
    """The "data" line of a recipe: the photos, the hold-out and how crops are taken."""
    photos = f"{n_photos} photos of {Path(data_dir).name}/ (every {holdout_every}th held out)"
    if encoded_sides is not None:
        return (f"{photos}, encoded whole once at short sides {list(encoded_sides)} (random h-flip), random "
                f"{crop}x{crop} crops aligned to the latent grid")
    return f"{photos}, random {crop}x{crop} crops of the photo rescaled to a short side uniform in {list(short_side)}, h-flips"


def sync_vae(src: Path, dst: Path, sha: str) -> None:
    """Make ``dst`` (the shipped ``vae/``) hold the autoencoder the UNet is trained on (file by file,
    atomically), when the UNet was trained from a separate ``--vae`` folder."""
    weights = "diffusion_pytorch_model.safetensors"
    if src.resolve() == dst.resolve():
        return
    if (dst / weights).is_file() and file_sha256(dst / weights) == sha:
        return
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "recipe.json", weights):
        if (src / name).is_file():
            atomic_write_bytes(dst / name, (src / name).read_bytes())
            os.chmod(dst / name, 0o644)


def export_ldm_stage(out: Path, stage: str, model: nn.Module, recipe: dict, prediction: str = "epsilon",
                     vae: tuple[Path, str] | None = None) -> None:
    """One stage of a latent-SR folder: index and scheduler config, ``model`` in fp16 to ``out/stage`` with its
    ``recipe.json``, then the README; ``vae`` (source folder, sha256): the autoencoder to ship beside it."""
    write_ldm_meta(out, prediction)
    save_diffusers_fp16(model, out / stage)
    if vae is not None:
        sync_vae(vae[0], out / "vae", vae[1])
    write_model_json(out / stage / "recipe.json", recipe)
    write_ldm_readme(out)
