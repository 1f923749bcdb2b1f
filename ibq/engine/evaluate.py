"""Reconstruction evaluation over a whole validation set: codebook usage from an exact histogram,
per-image PSNR/SSIM, LPIPS when its backbone is available, and rFID with the shipped FID network."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ibq.metrics.codebook import CodebookHistogram
from ibq.metrics.fid import FeatureStats, fid_from_stats, to_uint8
from ibq.metrics.image import psnr_ssim


@dataclass
class ReconstructionEvaluator:
    loader: DataLoader
    device: torch.device
    fid_network: object | None = None  # ibq.metrics.fid network: .features(uint8) -> (N, 2048)
    lpips_model: nn.Module | None = None
    grid_images: int = 8
    real_stats: FeatureStats | None = field(default=None, init=False)  # computed once, reused by every eval

    @torch.no_grad()
    def __call__(self, tokenizer: nn.Module, codebook_size: int, desc: str = "eval") -> tuple[dict, Tensor]:
        tokenizer.eval()
        histogram = CodebookHistogram(codebook_size, self.device)
        psnrs, ssims, lpips_values = [], [], []
        fake_stats = FeatureStats() if self.fid_network is not None else None
        collect_real = self.fid_network is not None and self.real_stats is None
        real_stats = FeatureStats() if collect_real else self.real_stats
        grid = None
        for images, _ in tqdm(self.loader, desc=desc, leave=False, dynamic_ncols=True):
            images = images.to(self.device)
            quantized = tokenizer.encode(images)
            reconstructions = tokenizer.decode(quantized.z_q).float().clamp(-1, 1)
            histogram.update(quantized.indices)
            batch_psnr, batch_ssim = psnr_ssim(images, reconstructions)
            psnrs += batch_psnr
            ssims += batch_ssim
            if self.lpips_model is not None:
                lpips_values.append(self.lpips_model(images, reconstructions).flatten().cpu())
            if fake_stats is not None:
                fake_stats.update(self.fid_network.features(to_uint8(reconstructions)))
                if collect_real:
                    real_stats.update(self.fid_network.features(to_uint8(images)))
            if grid is None:
                n = min(self.grid_images, len(images))
                grid = torch.cat([images[:n], reconstructions[:n]]).cpu()
        histogram.all_reduce()
        self.real_stats = real_stats
        metrics = {
            **histogram.summary(),
            "psnr": sum(psnrs) / len(psnrs),
            "ssim": sum(ssims) / len(ssims),
            "lpips": float(torch.cat(lpips_values).mean()) if lpips_values else None,
            "eval/images": len(psnrs),
        }
        if fake_stats is not None:
            metrics.update(
                {"rfid": fid_from_stats(real_stats, fake_stats), "rfid/samples": fake_stats.count, "rfid/network": self.fid_network.name}
            )
        else:
            metrics.update({"rfid": None, "rfid/samples": 0, "rfid/network": None})
        return metrics, grid
