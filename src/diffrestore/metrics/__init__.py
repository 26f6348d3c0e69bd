"""Image-quality metrics, a leaf of the package: full-reference scores (``quality``: PSNR, PSNR-Y,
SSIM, consistency), distribution scores (``quality``: FID, KID over ``inception`` features) and LPIPS
(``lpips``). Nothing here imports the rest of diffrestore."""
