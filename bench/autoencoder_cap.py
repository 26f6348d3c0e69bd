"""What the latent prior's autoencoder allows on the evaluation crops.

Every latent method's output is a decode ``D(z)``, so the reconstruction ``D(E(x))`` of the clean image
bounds what SRLDM can reach. DDRM-LDM returns the consistent version of its decode (for sr4, the
range-null-space projection ``A^+ y + (I - A^+ A) D(z)``), so its bound is the projected
reconstruction. Both are printed next to the bicubic baseline, as means over the same images
(PSNR in dB on [-1, 1] images clamped to that range, as ``diffrestore evaluate`` scores).

``--fid`` adds each one's FID against the clean photos (the same Inception features as ``evaluate``):
the reconstruction's FID is what SRLDM would reach with a perfect UNet, so if it is not clearly below
the bicubic baseline's, no latent UNet can make SRLDM beat bicubic in FID.

    python bench/autoencoder_cap.py --data ../shared/data/imagenet-sample-500 --first 100 \
        --prior builtin:ldmsr-s [--fid] [--skip 100]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

from diffrestore.evaluation.data import find_images, load_eval_image
from diffrestore.metrics.inception import inception_features, load_inception
from diffrestore.metrics.quality import fid_from_features, psnr
from diffrestore.methods.ddrm_ldm import spectral_consistency
from diffrestore.operators.tasks import make_task
from diffrestore.priors.loading import load_prior


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--first", type=int, default=100, help="the first N images in sorted order")
    ap.add_argument("--skip", type=int, default=0, help="skip this many before them (e.g. 100: held-out photos)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--prior", default="builtin:ldmsr-s")
    ap.add_argument("--fid", action="store_true", help="also the FID of each against the clean photos")
    args = ap.parse_args()
    extractor = load_inception("cpu") if args.fid else None  # fails early, with how to get the weights

    prior = load_prior(args.prior, kind="latent")
    task = make_task("sr4", (3, args.size, args.size))
    A = task.operator
    sums = {"reconstruction D(E(x))": 0.0, "projected reconstruction (sr4)": 0.0, "bicubic baseline (sr4)": 0.0}
    feats: dict[str, list] = {key: [] for key in ("clean", *sums)}
    files = find_images(args.data)[args.skip : args.skip + args.first]
    with torch.no_grad():
        for f in tqdm(files, desc="images"):
            x = load_eval_image(f, args.size)[None]
            y = A.H(x)
            rec = prior.decode(prior.encode(x))
            outs = (rec, spectral_consistency(A, rec, y, 0.0, 1.0), task.baseline(y))
            for key, out in zip(sums, outs):
                sums[key] += float(psnr(out.clamp(-1, 1), x))
                if extractor is not None:
                    feats[key].append(inception_features(out.clamp(-1, 1), extractor=extractor))
            if extractor is not None:
                feats["clean"].append(inception_features(x, extractor=extractor))
    which = f"first {len(files)}" if args.skip == 0 else f"{len(files)} (sorted {args.skip}-{args.skip + len(files) - 1})"
    print(f"{args.prior}, {which} images of {args.data} at {args.size}x{args.size}:")
    for key, total in sums.items():
        fid = f"   FID {fid_from_features(np.concatenate(feats['clean']), np.concatenate(feats[key])):6.1f}" if extractor else ""
        print(f"  {key:32s} {total / len(files):6.2f} dB{fid}")


if __name__ == "__main__":
    main()
