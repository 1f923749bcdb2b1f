"""Exponential moving average of a model's weights; evaluation and tokenization use the average."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self._average = get_ema_multi_avg_fn(decay)  # one fused lerp over all tensors, not one call per tensor

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averages = list(self.shadow.parameters())
        lives = [p.detach().to(a.dtype) for a, p in zip(averages, model.parameters())]
        self._average(averages, lives, None)
        for average, live in zip(self.shadow.buffers(), model.buffers()):
            average.copy_(live)
