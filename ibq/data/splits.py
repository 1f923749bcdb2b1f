from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

if TYPE_CHECKING:  # ibq.data.shards builds DataSplits itself
    from ibq.data.shards import ShardStream


@dataclass
class DataSplits:
    """A training set addressed by sample position, or a ShardStream (see batches.py), or None for a set
    that is only evaluated on; a fixed validation set; and how to load them. `name`, when set, is the
    prefix ibq-eval also reports the set's metrics under (coco/rfid), so that one run keeps its numbers
    on several sets. `num_classes` lets stage II refuse a model with too few classes before it trains."""

    train: Dataset | ShardStream | None
    val: Dataset
    num_workers: int = 0
    name: str | None = None
    num_classes: int | None = None  # how many classes the training labels index, where known before reading them


# Data config keys that do not change the images: loading speed, and the name ibq-eval reports a set's metrics under.
NOT_IDENTITY = ("num_workers", "read_timeout_s", "name")


def data_identity(data_config: DictConfig | dict) -> dict:
    """The data config without NOT_IDENTITY: what identifies the images (token shards, cached statistics)."""
    if isinstance(data_config, DictConfig):
        data_config = OmegaConf.to_container(data_config, resolve=True)
    return {key: value for key, value in data_config.items() if key not in NOT_IDENTITY}
