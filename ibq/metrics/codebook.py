"""Exact codebook usage over any number of batches: a K-bin histogram, never a tokens x K matrix."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


class CodebookHistogram:
    def __init__(self, codebook_size: int, device: torch.device | str = "cpu"):
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.int64, device=device)

    def update(self, indices: Tensor) -> None:
        self.counts += torch.bincount(indices.flatten().to(self.counts.device), minlength=self.codebook_size)

    def all_reduce(self) -> None:
        """Sum the histograms of all ranks (a no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts)

    @property
    def tokens(self) -> int:
        return int(self.counts.sum())

    def summary(self) -> dict[str, float]:
        """Utilization, perplexity and dead codes, with the token count they were measured over.

        T tokens can use at most min(1, T/K) of K codes, and a uniform assignment about 1 - e^(-T/K):
        `codebook/utilization_bound` records the latter so that small-sample figures are read fairly."""
        tokens = self.tokens
        used = int((self.counts > 0).sum())
        probs = self.counts[self.counts > 0].double() / max(tokens, 1)
        entropy = float(-(probs * probs.log()).sum())
        return {
            "codebook/utilization": used / self.codebook_size,
            "codebook/perplexity": math.exp(entropy),
            "codebook/dead": self.codebook_size - used,
            "codebook/tokens": tokens,
            "codebook/utilization_bound": 1.0 - math.exp(-tokens / self.codebook_size),
        }
