"""Per-iteration LR / weight-decay schedule of the stage-II model (VAR's `lr_wd_annealing`, 'lin0').

LR: linear warm-up from warmup_start x peak to peak over warmup_steps, flat for the first flat_fraction of
the remaining steps, then linear decay to final_lr_ratio x peak at the last step (total_steps - 1).
Weight decay: cosine from weight_decay at step 0 to final_weight_decay at the last step (0: constant)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ibq.errors import UserError


class ScheduleValues(NamedTuple):
    lr: float
    weight_decay: float


def var_schedule(
    step: int,
    *,
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    final_lr_ratio: float,
    weight_decay: float,
    final_weight_decay: float = 0.0,
    warmup_start: float = 0.005,
    flat_fraction: float = 0.05,
) -> ScheduleValues:
    if not 0 <= warmup_steps < total_steps - 1:
        raise UserError(f"warmup_steps={warmup_steps} is invalid: it must be in 0..total_steps-2 (total_steps={total_steps})")
    if step < warmup_steps:
        lr_ratio = warmup_start + (1 - warmup_start) * step / warmup_steps
    else:
        progress = (step - warmup_steps) / (total_steps - 1 - warmup_steps)
        if progress < flat_fraction:
            lr_ratio = 1.0
        else:
            lr_ratio = final_lr_ratio + (1 - final_lr_ratio) * (1 - progress) / (1 - flat_fraction)
    end_weight_decay = final_weight_decay or weight_decay
    cosine = 0.5 + 0.5 * math.cos(math.pi * step / (total_steps - 1))
    return ScheduleValues(peak_lr * lr_ratio, end_weight_decay + (weight_decay - end_weight_decay) * cosine)


def apply_schedule(optimizer: torch.optim.Optimizer, values: ScheduleValues, decay_all_groups: bool = True) -> None:
    """Set every group's LR, and the weight decay of the decayed groups.

    decay_all_groups=True reproduces the released code, whose annealing also overwrites the weight decay of
    the no-decay group (norm weights and biases); False keeps groups created with weight_decay 0
    undecayed."""
    for group in optimizer.param_groups:
        group["lr"] = values.lr
        # remembered on first use, like torch's schedulers keep "initial_lr"
        decayed = group.setdefault("initial_weight_decay", group["weight_decay"]) > 0
        if decay_all_groups or decayed:
            group["weight_decay"] = values.weight_decay
