"""Evaluation over whole sets. Reconstruction: codebook usage from an exact histogram, per-image PSNR/SSIM,
LPIPS for each available backbone, and rFID against the real images of the same pass. Generation: gFID
against reference statistics and the Inception Score of a stream of uint8 samples."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ibq.metrics.codebook import CodebookHistogram
from ibq.metrics.fid import (
    FeatureStats,
    fid_from_stats,
    frechet_distance,
    inception_score,
    to_uint8,
)
from ibq.metrics.image import psnr_ssim
from ibq.metrics.networks import TorchFidelityNetwork
from ibq.metrics.reference import ReferenceCache, ReferenceKey, ReferenceStats

log = logging.getLogger(__name__)


@dataclass
class ReconstructionEvaluator:
    loader: DataLoader
    device: torch.device
    fid_network: object | None = None  # ibq.metrics.fid network: .features(uint8) -> (N, 2048)
    lpips_model: nn.Module | None = None
    grid_images: int = 8
    lpips_models: dict[str, nn.Module] = field(default_factory=dict)  # reported as lpips/<name>
    # Where the real images' statistics are kept between processes (runs of a sweep, ibq-eval of a run): the
    # FID network's pass over them is half of an evaluation's cost, and the same for every tokenizer.
    reference_cache: ReferenceCache | None = None
    reference_key: ReferenceKey | None = None
    real_stats: FeatureStats | None = field(default=None, init=False)  # computed once (or read from the cache), reused
    reference_cached: bool | None = field(default=None, init=False)  # whether real_stats came from the cache
    code_counts: Tensor | None = field(default=None, init=False)  # the last call's tokens per code (K,), on the host

    @torch.no_grad()
    def __call__(self, tokenizer: nn.Module, codebook_size: int, desc: str = "eval") -> tuple[dict, Tensor]:
        tokenizer.eval()
        if self.fid_network is not None and self.real_stats is None and self.reference_cache is not None:
            self.real_stats = self.reference_cache.load(self.reference_key)
            self.reference_cached = self.real_stats is not None
            if self.reference_cached:
                log.info("rFID: the real images' statistics from %s", self.reference_cache.path(self.reference_key))
        histogram = CodebookHistogram(codebook_size, self.device)
        psnrs, ssims, lpips_values = [], [], []
        named_lpips = {name: [] for name in self.lpips_models}
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
            for name, model in self.lpips_models.items():
                named_lpips[name].append(model(images, reconstructions).flatten().cpu())
            if fake_stats is not None:
                fake_stats.update(self.fid_network.features(to_uint8(reconstructions)))
                if collect_real:
                    real_stats.update(self.fid_network.features(to_uint8(images)))
            if grid is None:
                n = min(self.grid_images, len(images))
                grid = torch.cat([images[:n], reconstructions[:n]]).cpu()
        histogram.all_reduce()
        self.code_counts = histogram.counts.cpu()
        self.real_stats = real_stats
        if collect_real and self.reference_cache is not None:
            self._store_real_stats()
        metrics = {
            **histogram.summary(),
            "psnr": sum(psnrs) / len(psnrs),
            "ssim": sum(ssims) / len(ssims),
            "lpips": float(torch.cat(lpips_values).mean()) if lpips_values else None,
            **{f"lpips/{name}": float(torch.cat(values).mean()) for name, values in named_lpips.items()},
            "eval/images": len(psnrs),
        }
        if fake_stats is not None:
            metrics.update(
                {"rfid": fid_from_stats(real_stats, fake_stats), "rfid/samples": fake_stats.count, "rfid/network": self.fid_network.name}
            )
        else:
            metrics.update({"rfid": None, "rfid/samples": 0, "rfid/network": None})
        return metrics, grid

    def _store_real_stats(self) -> None:
        """Caches real_stats; a cache that cannot be written costs later evaluations time, not this one's result."""
        try:
            self.reference_cache.store(self.reference_key, self.real_stats)
        except OSError as error:
            log.warning("the real images' FID statistics could not be cached in %s (%s): later evaluations compute them again",
                        self.reference_cache.directory, error)


@torch.no_grad()
def real_feature_stats(loader: DataLoader, network, device: torch.device, desc: str = "reference") -> FeatureStats:
    """FID-network statistics of a dataset's images ([-1, 1] floats, uint8-rounded as the samples are)."""
    stats = FeatureStats()
    for images, _ in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        stats.update(network.features(to_uint8(images.to(device))))
    return stats


@dataclass
class GenerationEvaluator:
    """gFID against reference statistics and IS of uint8 samples, in one pass over them.

    `inception` gives (features, logits) per batch; when it is also the FID network, one forward pass per batch
    serves both metrics."""

    device: torch.device
    fid_network: object | None = None
    inception: TorchFidelityNetwork | None = None
    is_splits: int = 10
    is_shuffle: bool = True

    @torch.no_grad()
    def __call__(self, batches: Iterable[Tensor], reference: ReferenceStats | None, total: int | None = None) -> dict:
        fake_stats = None  # sized by the network's first batch of features
        logits = []
        for batch in tqdm(batches, desc="samples", total=total, leave=False, dynamic_ncols=True):
            batch = batch.to(self.device)
            inception_features = None
            if self.inception is not None:
                inception_features, batch_logits = self.inception.features_and_logits(batch)
                logits.append(batch_logits.cpu())
            if self.fid_network is not None:
                shared = self.fid_network is self.inception
                features = inception_features if shared else self.fid_network.features(batch)
                if fake_stats is None:
                    fake_stats = FeatureStats(dim=features.shape[1])
                fake_stats.update(features)
        metrics = {}
        if fake_stats is not None:
            metrics.update(
                {
                    "gfid": self._fid(reference, fake_stats),
                    "gfid/samples": fake_stats.count,
                    "gfid/network": self.fid_network.name,
                    "gfid/reference": reference.source,
                    "gfid/reference_samples": reference.count,
                }
            )
        if self.inception is not None:
            all_logits = torch.cat(logits)
            mean, std = inception_score(all_logits, splits=self.is_splits, shuffle=self.is_shuffle)
            metrics.update(
                {
                    "is": mean,
                    "is/std": std,
                    "is/samples": len(all_logits),
                    "is/splits": self.is_splits,
                    "is/shuffle": self.is_shuffle,
                    "is/network": self.inception.name,
                }
            )
        return metrics

    @staticmethod
    def _fid(reference: ReferenceStats, fake: FeatureStats) -> float:
        if fake.count < fake.dim:
            warnings.warn(
                f"gFID from {fake.count} samples < {fake.dim} feature dims: finite but biased, not comparable to "
                "gFIDs over 10k-50k samples",
                RuntimeWarning,
                stacklevel=2,  # the line that records gfid (3 would name torch.no_grad's wrapper)
            )
        return frechet_distance(reference.mu, reference.sigma, fake.mean(), fake.covariance())
