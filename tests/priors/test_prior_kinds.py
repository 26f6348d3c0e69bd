"""Every prior a user can load is an instance of exactly one of ``PixelPrior`` / ``LatentSRPrior`` (what
the methods, the memory estimate and the tiling read to tell the kinds apart), whatever wrapped it:
tiles, frozen graphs, another precision. The kind is checked against what the model does (a latent
prior encodes an image to its latent grid; a pixel prior has no encoder) and, for the built-in
priors, against the catalog, which reads the kind off the folder's files."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from diffrestore.priors.base import LatentSRPrior, PixelPrior
from diffrestore.priors.catalog import list_builtin_priors
from diffrestore.priors.loading import load_prior
from diffrestore.priors.tiled import TiledLatentSRPrior, TiledPixelPrior, plan_tiling, tiled_prior

ADM = {"num_head_channels": 16}


def _kind_by_behaviour(prior) -> str:
    """"latent" when the prior encodes a 32x32 image to its latent grid, "pixel" when it has no encoder."""
    if not callable(getattr(prior, "encode", None)):
        return "pixel"
    x = torch.zeros(1, 3, 32, 32, dtype=next(prior.parameters()).dtype)
    with torch.no_grad():
        z = prior.encode(x)
    assert tuple(z.shape) == (1, prior.latent_channels, 32 // prior.downscale, 32 // prior.downscale)
    return "latent"


def _kind_by_class(prior) -> str:
    pixel, latent = isinstance(prior, PixelPrior), isinstance(prior, LatentSRPrior)
    assert pixel != latent, f"{type(prior).__name__} is {'both' if pixel else 'neither'} kinds"
    return "latent" if latent else "pixel"


def _variants(load):
    """The ways a loaded prior reaches a method: as loaded, tiled (by hand and by the memory plan),
    with frozen graphs, in bf16 (frozen too), and tiled around a frozen one."""
    yield "loaded", load()
    yield "tiled", tiled_prior(load(), 64, 16)
    yield "planned tiles", plan_tiling(load(), (128, 128), tile=64, overlap=16)[0]
    yield "frozen", load().use_frozen_graphs()
    yield "bf16", load(dtype="bf16")
    yield "bf16 frozen", load(dtype="bf16", frozen_graphs=True)
    yield "tiled frozen", tiled_prior(load().use_frozen_graphs(), 64, 16)


def _check_every_variant(load, kind: str) -> None:
    for how, prior in _variants(load):
        assert _kind_by_class(prior) == kind, how
        assert _kind_by_behaviour(prior) == kind, how
        if how.startswith("tiled") or how == "planned tiles":
            assert isinstance(prior, TiledLatentSRPrior if kind == "latent" else TiledPixelPrior), how


@pytest.mark.parametrize("name", ["pixel-s", "ldmsr-s"])
def test_builtin_priors_in_every_wrapper(name):
    listed = {p.name: p.kind for p in list_builtin_priors()}
    _check_every_variant(lambda **kw: load_prior(f"builtin:{name}", **kw), listed[name])


def test_adm_checkpoint_is_a_pixel_prior(shared):
    path = shared / "golden" / "ddrm" / "unet_state_dict.pt"
    _check_every_variant(lambda **kw: load_prior(path, adm_config=ADM, **kw), "pixel")


def test_ldm_checkpoint_is_a_latent_prior(shared):
    path = shared / "golden" / "ldm" / "ldm_sr_tiny.ckpt"
    _check_every_variant(lambda **kw: load_prior(path, **kw), "latent")


def test_diffusers_unet_folder_is_a_pixel_prior(tmp_path):
    torch.manual_seed(0)
    UNet2DModel(sample_size=16, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4).save_pretrained(tmp_path / "m")  # fmt: skip
    _check_every_variant(lambda **kw: load_prior(tmp_path / "m", **kw), "pixel")
