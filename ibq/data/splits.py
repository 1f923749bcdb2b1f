from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset


@dataclass
class DataSplits:
    """A training set addressed by sample position, a fixed validation set, and how to load them."""

    train: Dataset
    val: Dataset
    num_workers: int = 0
