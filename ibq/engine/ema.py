"""Exponential moving average of a model's weights; evaluation and tokenization use the average."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averages = list(self.shadow.parameters())
        lives = [p.detach().to(a.dtype) for a, p in zip(averages, model.parameters())]
        torch._foreach_lerp_(averages, lives, 1.0 - self.decay)  # one fused call instead of one per tensor
        for average, live in zip(self.shadow.buffers(), model.buffers()):
            average.copy_(live)
