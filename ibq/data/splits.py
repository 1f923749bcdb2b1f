from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

if TYPE_CHECKING:  # shards.py builds DataSplits itself
    from ibq.data.shards import ShardStream


@dataclass
class DataSplits:
    """A training set addressed by sample position, or a ShardStream (see batches.py), or None for a set
    that is only evaluated on; a fixed validation set; and how to load them. `name`, when set, is the
    prefix ibq-eval also reports the set's metrics under (coco/rfid), so that one run keeps its numbers
    on several sets."""

    train: Dataset | ShardStream | None
    val: Dataset
    num_workers: int = 0
    name: str | None = None
