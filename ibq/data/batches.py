"""What a training job reads: micro-batches of its rank, from the resumed step on, and the data's place
in the checkpoint. Datasets addressed by position resume from the step alone; shard streams carry
their cursors in the checkpoint."""

from __future__ import annotations

from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ibq.data.positions import PositionSampler
from ibq.data.shards import ShardStream
from ibq.data.splits import DataSplits
from ibq.errors import UserError


class PositionBatches:
    def __init__(self, dataset: Dataset, micro_batch: int, global_batch: int, start_step: int, steps: int,
                 rank: int, world_size: int, num_workers: int, pin_memory: bool = False):
        sampler = PositionSampler(start_step * global_batch, steps * global_batch, rank, world_size, global_batch)
        self.loader = iter(DataLoader(dataset, batch_size=micro_batch, sampler=sampler, num_workers=num_workers, drop_last=True,
                                      pin_memory=pin_memory))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        return next(self.loader)

    def state(self) -> None:
        return None  # the step is the position

    def counters(self) -> dict[str, int]:
        return {}  # files are checked when the dataset is built


def training_batches(data: DataSplits, micro_batch: int, global_batch: int, start_step: int, steps: int,
                     rank: int, world_size: int, stream_state: dict | None, pin_memory: bool = False):
    """`pin_memory` (for a CUDA device): batches in page-locked memory, which a non_blocking copy sends to the device
    while the host queues the step's kernels; from pageable memory the driver may wait for the stream first."""
    if isinstance(data.train, ShardStream):
        return data.train.batches(micro_batch, rank, world_size, stream_state, pin_memory)
    return PositionBatches(data.train, micro_batch, global_batch, start_step, steps, rank, world_size, data.num_workers, pin_memory)


def trainable(data: DataSplits, data_config) -> None:
    if data.train is None:
        raise UserError(f"data: {data_config._target_} is an evaluation set without training images: train on "
                        f"data=photos, image_folder, shards or pretrain_mix, and evaluate on it with ibq-eval")


def indexed_train(data: DataSplits, data_config, app: str) -> Dataset:
    """The training set as a dataset with positions, which tokenizing and stage II read."""
    trainable(data, data_config)
    if isinstance(data.train, ShardStream):
        raise UserError(f"data: {app} reads datasets with positions (photos, image_folder), not shard streams "
                        f"({data_config._target_}): tokenize an image folder, or pack one from the shards")
    return data.train
