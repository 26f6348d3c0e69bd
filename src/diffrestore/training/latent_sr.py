"""Train the built-in latent super-resolution prior (LDM-SR style), in two stages.

``autoencoder`` trains the autoencoder (:mod:`.autoencoder`), then ``unet`` the latent UNet on its
frozen latent space (:mod:`.latent_unet`); ``decoder`` optionally fine-tunes the decoder, encoder frozen.
Each stage exports into one model folder in the diffusers hub layout (``vae/``, ``unet/``, ``scheduler/``)::

    python -m diffrestore.training.latent_sr autoencoder --data PHOTOS --out MODEL --run RUN_AE [--resume]
    python -m diffrestore.training.latent_sr unet --data PHOTOS --out MODEL --run RUN_UNET [--resume]
"""

from __future__ import annotations

import argparse
import sys

from ..priors.base import PREDICTION_TYPES
from .autoencoder import train_autoencoder, train_decoder
from .checkpoints import TrainingError
from .latent_unet import train_latent_unet
from .options import add_loop_arguments, cli_main, int_list


def train_latent_sr(stage: str, data_dir, out_dir, run_dir, **kw) -> dict:
    """``stage`` is 'autoencoder', 'unet' or 'decoder' (fine-tune of a trained autoencoder's decoder)."""
    if stage == "autoencoder":
        return train_autoencoder(data_dir, out_dir, run_dir, **kw)
    if stage == "unet":
        return train_latent_unet(data_dir, out_dir, run_dir, **kw)
    if stage == "decoder":
        return train_decoder(data_dir, out_dir, run_dir, **kw)
    raise TrainingError(f"unknown stage {stage!r} (use autoencoder, unet or decoder)")


def build_parser(parser_class=argparse.ArgumentParser, prog: str | None = None) -> argparse.ArgumentParser:
    """The trainer's command line (``parser_class`` and ``prog``: the ``diffrestore train`` command's own)."""
    p = parser_class(prog=prog or "python -m diffrestore.training.latent_sr", description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["autoencoder", "unet", "decoder"])
    add_loop_arguments(
        p, out_help="model folder (hub layout) to export vae/ or unet/ into", warmup=None,
        warmup_help="default 500 (autoencoder), 1000 (unet)",
    )
    p.add_argument("--vae", default=None, help="(unet, decoder) autoencoder folder; default OUT/vae (unet)")
    p.add_argument("--crop", type=int, default=None, help="default 64 (autoencoder), 128 (unet)")
    p.add_argument("--channels", type=int_list, default=None)
    p.add_argument("--layers-per-block", type=int, default=None)
    p.add_argument("--norm-groups", type=int, default=None)
    p.add_argument("--kl-weight", type=float, default=1e-6, help="(autoencoder)")
    p.add_argument("--mse-weight", type=float, default=1.0, help="(autoencoder)")
    p.add_argument("--logvar-init", type=float, default=-6.0, help="(autoencoder) initial posterior log-variance")
    p.add_argument("--lr-noise-frac", type=float, default=0.5, help="(unet)")
    p.add_argument("--lr-noise-max", type=float, default=0.1, help="(unet)")
    p.add_argument("--attention", action="store_true", help="(unet) mid-block attention")
    p.add_argument("--encoded-sides", type=int_list, default=None,
                   help="(unet) encode the photos whole once at these short sides (e.g. 256,192) and crop latents")
    p.add_argument("--prediction", choices=PREDICTION_TYPES, default="epsilon", help="(unet) target")
    p.add_argument("--margin", type=int, default=16, help="(decoder) pixels on each crop side left out of the loss")
    p.add_argument("--lpips-weight", type=float, default=0.0, help="(decoder) weight of an LPIPS-AlexNet loss term")
    return p


def _train_from_args(a, kw: dict) -> dict:
    for name, val in (("crop", a.crop), ("channels", a.channels), ("layers_per_block", a.layers_per_block),
                      ("norm_num_groups", a.norm_groups)):
        if val is not None:
            kw[name] = val
    if a.stage == "autoencoder":
        kw.update(kl_weight=a.kl_weight, mse_weight=a.mse_weight, logvar_init=a.logvar_init)
    elif a.stage == "decoder":
        if a.vae is None:
            raise TrainingError("the decoder stage needs --vae (the trained autoencoder folder)")
        flags = {"channels": "--channels", "layers_per_block": "--layers-per-block", "norm_num_groups": "--norm-groups"}
        given = [flag for name, flag in flags.items() if name in kw]
        if given:
            raise TrainingError(f"the decoder stage keeps the autoencoder's architecture: drop {', '.join(given)}")
        kw.update(vae_dir=a.vae, mse_weight=a.mse_weight, margin=a.margin, lpips_weight=a.lpips_weight)
        if a.encoded_sides is not None:
            kw["encoded_sides"] = a.encoded_sides
    else:
        kw.update(lr_noise_frac=a.lr_noise_frac, lr_noise_max=a.lr_noise_max, attention=a.attention, vae_dir=a.vae,
                  encoded_sides=a.encoded_sides, prediction=a.prediction)
    return train_latent_sr(a.stage, a.data, a.out, a.run, **kw)


def main(argv=None, parser_class=argparse.ArgumentParser, prog: str | None = None) -> int:
    return cli_main(build_parser(parser_class, prog), argv, _train_from_args)


if __name__ == "__main__":
    sys.exit(main())
