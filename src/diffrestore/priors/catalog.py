"""Built-in priors (``builtin:NAME``) and the ``--prior SPEC`` formats, without loading any network.

Kept free of diffusers and torch imports: ``diffrestore priors`` only reads folder listings and small JSON
files, and the CLI reads ``DEFAULT_PRIORS`` before it decides whether a command needs torch at all.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import NamedTuple

__all__ = ["BUILTIN_PREFIX", "DEFAULT_PRIORS", "SPEC_FORMATS", "BuiltinPrior", "builtin_dir", "list_builtin_priors", "resolve_spec"]

BUILTIN_PREFIX = "builtin:"

#: the built-in prior of each kind that the demo and the quick evaluation preset use unless told otherwise
DEFAULT_PRIORS = {"pixel": "builtin:pixel-s", "latent": "builtin:ldmsr-s"}

#: (how to write it, what it is) for every ``--prior SPEC`` that ``load_prior`` recognises
SPEC_FORMATS: tuple[tuple[str, str], ...] = (
    ("FILE.pt | FILE.safetensors",
     "guided-diffusion (ADM) UNet state dict, e.g. 256x256_diffusion_uncond.pt or the class-conditional "
     "256x256_diffusion.pt; hyper-parameters are read off the weights"),
    ("FOLDER with config.json",
     "diffusers UNet2DModel folder (optional scheduler_config.json), or a pipeline folder with unet/ and "
     "scheduler/"),
    ("FILE.ckpt + FILE.yaml",
     "original LDM super-resolution checkpoint (Lightning .ckpt) with its YAML config beside it "
     "(FILE.yaml or config.yaml)"),
    ("FOLDER with model_index.json",
     "diffusers latent SR folder in the CompVis/ldm-super-resolution-4x-openimages layout: unet/, vqvae/ "
     "(or vae/), scheduler/ (prediction_type epsilon or v_prediction)"),
    ("builtin:NAME",
     "a built-in prior: the folder src/diffrestore/priors/builtin/NAME/ (listed by `diffrestore priors`)"),
)  # fmt: skip

_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_FIRST_STAGES = ("vqvae", "vae")


class BuiltinPrior(NamedTuple):
    name: str
    kind: str  # "pixel" or "latent"
    description: str
    size_mb: float


def builtin_dir() -> Path:
    """Where ``builtin:NAME`` priors live (``src/diffrestore/priors/builtin``)."""
    return Path(__file__).resolve().parent / "builtin"


def resolve_spec(spec: str | Path) -> Path:
    """The path a ``--prior`` spec names: ``builtin:NAME`` -> the built-in folder, else the path itself."""
    spec = str(spec)
    if not spec.startswith(BUILTIN_PREFIX):
        return Path(spec).expanduser()
    name = spec[len(BUILTIN_PREFIX) :]
    root = builtin_dir()
    path = root / name
    if not name or "/" in name or "\\" in name or name.startswith(".") or not path.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        from .base import PriorLoadError  # torch: only on this error path

        raise PriorLoadError(
            f"unknown builtin prior {name!r} (available: {', '.join(have) if have else 'none'}; folder {root})"
        )
    return path


def list_builtin_priors(notes: list[str] | None = None) -> list[BuiltinPrior]:
    """The usable built-in priors, sorted by name.

    A folder without weights (a training run may still be writing it) is skipped with a one-line note,
    appended to ``notes`` when given, else issued as a warning.
    """
    root = builtin_dir()
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or folder.name.startswith((".", "_")):
            continue
        kind, missing = _inspect(folder)
        if missing:
            note = f"builtin prior {folder.name!r} skipped: {missing}"
            if notes is None:
                warnings.warn(note, stacklevel=2)
            else:
                notes.append(note)
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
        found.append(BuiltinPrior(folder.name, kind, _description(folder), round(size, 1)))
    return found


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / w).is_file() for w in _WEIGHT_NAMES)


def require_weights(folder: Path) -> None:
    """PriorLoadError naming every accepted weights file when a diffusers model folder has none (diffusers
    itself names only the last one it tried)."""
    if (folder / "config.json").is_file() and not _has_weights(folder):
        from .base import PriorLoadError  # torch: only on this error path

        raise PriorLoadError(f"{folder}: no weights ({' or '.join(_WEIGHT_NAMES)})")


def _inspect(folder: Path) -> tuple[str, str]:
    """(kind, what is missing; "" when complete), from the files alone."""
    index_path = folder / "model_index.json"
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return "", "unreadable model_index.json"
        first_stage = [c for c in _FIRST_STAGES if c in index]
        kind = "latent" if first_stage else "pixel"
        missing = [f"{c}/" for c in ["unet", *first_stage] if not _has_weights(folder / c)]
        return kind, f"no weights yet in {', '.join(missing)}" if missing else ""
    if (folder / "config.json").is_file():
        return "pixel", "" if _has_weights(folder) else "no weights yet (config.json only)"
    ckpts = sorted(folder.glob("*.pt")) + sorted(folder.glob("*.ckpt"))
    if len(ckpts) == 1:  # one checkpoint: ADM .pt, or LDM .ckpt with its YAML
        ckpt = ckpts[0]
        if ckpt.suffix == ".pt":
            return "pixel", ""
        yamls = (ckpt.with_suffix(".yaml"), ckpt.with_suffix(".yml"), folder / "config.yaml")
        return "latent", "" if any(y.is_file() for y in yamls) else f"no YAML config beside {ckpt.name}"
    return "", "not a model folder (no config.json, model_index.json or single checkpoint)"


def _description(folder: Path) -> str:
    """``description`` of diffrestore.json, else README.md's first line (without '#' and the name)."""
    try:
        desc = json.loads((folder / "diffrestore.json").read_text()).get("description")
        if isinstance(desc, str) and desc.strip():
            return desc.strip().splitlines()[0]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        pass
    try:
        lines = (folder / "README.md").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return ""
    line = next((ln.strip() for ln in lines if ln.strip()), "").lstrip("#").strip()
    if line.lower().startswith(folder.name.lower() + ":"):
        line = line[len(folder.name) + 1 :].strip()
    return line
