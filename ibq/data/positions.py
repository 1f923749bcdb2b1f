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
    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start
