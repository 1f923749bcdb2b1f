"""PSNR and SSIM as tokenizer papers compute them: per image, on images quantised to uint8 and read
back as float in [0, 1], data range 1, scikit-image's defaults (SSIM: 7x7 uniform window)."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from ibq.metrics.fid import to_uint8


def unit_images(images: Tensor) -> np.ndarray:
    """[-1, 1] (N, 3, H, W) -> (N, H, W, 3) float64 in [0, 1] after uint8 rounding."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy().astype(np.float64) / 255.0


def psnr_ssim(real: Tensor, reconstructed: Tensor) -> tuple[list[float], list[float]]:
    """Per-image PSNR (dB) and SSIM."""
    # here, not at import: scikit-image's metrics load scipy.stats, seconds of every app's start otherwise
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnrs, ssims = [], []
    for a, b in zip(unit_images(real), unit_images(reconstructed)):
        psnrs.append(float(peak_signal_noise_ratio(a, b, data_range=1.0)))
        ssims.append(float(structural_similarity(a, b, data_range=1.0, channel_axis=-1)))
    return psnrs, ssims
