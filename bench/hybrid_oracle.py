"""Why the report's DDRM-SRLDM fails, measured with a *perfect* latent denoiser.

DDRM needs, at every step, the unit-variance pixel noise ``n`` in ``x_t = sqrt(a) x0 + sqrt(1-a) n``.
The report's two ways of getting it from a latent model (``methods.ddrm_srldm``) are evaluated here
with an oracle in place of the latent UNet — the exact latent noise of ``E(x_t)`` relative to
``E(x0)`` — so that any failure is the combination's, not the network's:

  (a) eps = x_t - D(z_{t'}),  z_{t'} = sqrt(a') E(x0) + sqrt(1-a') e_lat   (one DDIM step, decoded)
  (b) eps = D(e_lat)

For each timestep it prints the std of each eps (should be 1), its correlation with the true noise
(should be 1), and the PSNR of DDRM's resulting x0 estimate ``(x_t - sqrt(1-a) eps) / sqrt(a)``,
next to what DDRM-LDM uses at the same step: ``D(z0)`` of the (here perfect) latent estimate, i.e.
the autoencoder's reconstruction.

    python bench/hybrid_oracle.py --data ../shared/data/imagenet-sample-500 --n 8 \
        --autoencoder src/diffrestore/priors/builtin/ldmsr-s
"""

from __future__ import annotations

import argparse
import math

import torch

from diffrestore.evaluation.data import choose_subset, find_images, load_eval_image
from diffrestore.metrics.quality import psnr
from diffrestore.priors.base import ldm_alphas_cumprod


def load_autoencoder(folder: str):
    """(encode, decode) of a latent SR folder's first stage (``vae/`` or ``vqvae/``)."""
    from pathlib import Path

    from diffrestore.priors._files import from_pretrained

    root = Path(folder)
    if (root / "vae").is_dir():
        from diffusers import AutoencoderKL

        ae = from_pretrained(AutoencoderKL, root / "vae", None).eval()
        return (lambda x: ae.encode(x).latent_dist.mean), (lambda z: ae.decode(z).sample)
    from diffusers import VQModel

    ae = from_pretrained(VQModel, root / "vqvae", None).eval()
    return (lambda x: ae.encode(x).latents), (lambda z: ae.decode(z).sample)


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--autoencoder", required=True, help="latent SR model folder (vae/ or vqvae/)")
    p.add_argument("--timesteps", default="50,200,500,800")
    p.add_argument("--skip", type=int, default=50, help="DDRM step size (1000 // steps)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    encode, decode = load_autoencoder(a.autoencoder)
    x0 = torch.stack([load_eval_image(f, a.size) for f in choose_subset(find_images(a.data), a.n, 0)])
    ac = ldm_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    z0 = encode(x0)
    recon = psnr(decode(z0).clamp(-1, 1), x0).mean().item()
    print(f"{a.n} images {a.size}x{a.size}; autoencoder reconstruction PSNR {recon:.2f} dB (caps DDRM-LDM's x0)")
    print("   t | std eps(a) corr(a) PSNR x0(a) | std eps(b) corr(b) PSNR x0(b) | x_t PSNR")
    for t in (int(s) for s in a.timesteps.split(",")):
        at, an = float(ac[t]), float(ac[max(t - a.skip, 0)])
        n = torch.randn(x0.shape, generator=g)
        x_t = math.sqrt(at) * x0 + math.sqrt(1 - at) * n
        e_lat = (encode(x_t) - math.sqrt(at) * z0) / math.sqrt(1 - at)  # the oracle latent noise
        eps_a = x_t - decode(math.sqrt(an) * z0 + math.sqrt(1 - an) * e_lat)
        eps_b = decode(e_lat)
        row = [f"{t:4d}"]
        for eps in (eps_a, eps_b):
            corr = torch.nn.functional.cosine_similarity((eps - eps.mean()).flatten(1), n.flatten(1)).mean().item()
            x0_hat = ((x_t - math.sqrt(1 - at) * eps) / math.sqrt(at)).clamp(-1, 1)
            row.append(f"{eps.std().item():10.3f} {corr:7.3f} {psnr(x0_hat, x0).mean().item():9.2f} dB")
        row.append(f"{psnr(x_t.clamp(-1, 1), x0).mean().item():6.2f} dB")
        print(" | ".join(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
