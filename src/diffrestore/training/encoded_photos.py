"""Training photos encoded once by a frozen autoencoder, cached in the run folder (:class:`EncodedPhotos`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..image_io import atomic_path


class EncodedPhotos:
    """The training photos encoded once, whole, at a few fixed short sides; batches are aligned crops.

    Why: it spares the encoder at every step, and a crop of a whole-photo latent is what a UNet meets at
    inference (images are encoded whole), border effects included. Each photo is resized to each short
    side in ``sides`` (long side a multiple of 4), flipped with probability 1/2 once, and its posterior
    mean kept in fp16 beside the uint8 pixels; a batch crops both at the same latent positions.
    """

    def __init__(self, pixels: list[torch.Tensor], latents: list[torch.Tensor]):
        self.pixels, self.latents = pixels, latents

    @classmethod
    @torch.no_grad()
    def encode(cls, photos, vae, sides, device, seed: int) -> "EncodedPhotos":
        from PIL import Image
        from tqdm import tqdm

        rng = np.random.default_rng(seed)
        pixels, latents = [], []
        for img in tqdm(photos, desc="encoding photos", mininterval=30):
            w, h = img.size
            for side in sides:
                scale = side / min(w, h)
                size = (max(4, round(w * scale / 4) * 4), max(4, round(h * scale / 4) * 4))
                a = torch.from_numpy(np.array(img.resize(size, Image.Resampling.BICUBIC))).permute(2, 0, 1)
                if rng.random() < 0.5:
                    a = a.flip(2)
                x = a[None].float().div(127.5).sub(1.0).to(device)
                latents.append(vae.encode(x).latent_dist.mean[0].half().cpu())
                pixels.append(a.contiguous())
        return cls(pixels, latents)

    def batch(self, n: int, crop: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels (n, 3, crop, crop) float in [-1, 1], latents (n, c, crop/4, crop/4) float)."""
        c4 = crop // 4
        xs, zs = [], []
        for _ in range(n):
            k = int(rng.integers(len(self.latents)))
            z = self.latents[k]
            i = int(rng.integers(z.shape[1] - c4 + 1))
            j = int(rng.integers(z.shape[2] - c4 + 1))
            zs.append(z[:, i : i + c4, j : j + c4].float())
            xs.append(self.pixels[k][:, 4 * i : 4 * i + crop, 4 * j : 4 * j + crop].float())
        return torch.stack(xs).div(127.5).sub(1.0), torch.stack(zs)


def load_or_encode_photos(run_dir: Path, photos, vae, vae_sha: str, sides, device, seed: int) -> EncodedPhotos:
    """:meth:`EncodedPhotos.encode`, cached in ``run_dir/encoded_photos.pt`` (reused when the autoencoder,
    the sides, the photo count and the seed are the same)."""
    key = {"vae_sha256": vae_sha, "sides": [int(v) for v in sides], "photos": len(photos), "seed": int(seed)}
    path = Path(run_dir) / "encoded_photos.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged or foreign cache is encoded again and replaced
            cached = {}
        if isinstance(cached, dict) and cached.get("key") == key:
            return EncodedPhotos(cached["pixels"], cached["latents"])
    enc = EncodedPhotos.encode(photos, vae, sides, device, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"key": key, "pixels": enc.pixels, "latents": enc.latents}, tmp)
    return enc
