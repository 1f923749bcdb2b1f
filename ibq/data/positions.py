"""Training data addressed by global sample position (step * batch_size + i).

Every random choice for a sample is drawn from a generator seeded by (seed, position), and the loader
starts at the resumed step's position, so an interrupted and resumed run sees the same samples in
the same order as an uninterrupted one, whatever the number of loader workers."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def position_generator(seed: int, position: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + position * 0x85EBCA77) % (2**63))


class PositionSampler(Sampler[int]):
    """Positions [start, stop) of the global stream. With world_size > 1, only this rank's share: of
    each consecutive `batch_size` positions (one global batch), the rank-th block of
    batch_size / world_size, so the ranks together see exactly the one-process stream."""

    def __init__(self, start: int, stop: int, rank: int = 0, world_size: int = 1, batch_size: int | None = None):
        if world_size > 1 and (batch_size is None or batch_size % world_size or start % batch_size or stop % batch_size):
            raise ValueError("with several ranks, batch_size must divide by world_size and start/stop by batch_size")
        self.start, self.stop = start, stop
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size

    def __iter__(self):
        if self.world_size == 1:
            return iter(range(self.start, self.stop))
        share = self.batch_size // self.world_size
        return (
            first + self.rank * share + i
            for first in range(self.start, self.stop, self.batch_size)
            for i in range(share)
        )

    def __len__(self) -> int:
        return (self.stop - self.start) // self.world_size


def random_crop(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A size x size crop at a position drawn from `generator`."""
    top = int(torch.randint(image.shape[-2] - size + 1, (1,), generator=generator))
    left = int(torch.randint(image.shape[-1] - size + 1, (1,), generator=generator))
    return image[..., top : top + size, left : left + size]
