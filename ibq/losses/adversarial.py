"""GAN losses of VQGAN/IBQ: hinge for the discriminator, non-saturating for the generator, LeCAM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def non_saturating_g_loss(fake_logits: Tensor) -> Tensor:
    """On the patch logits averaged per image, as the released IBQ code does."""
    return F.softplus(-fake_logits.flatten(1).mean(1)).mean()


class LeCAM(nn.Module):
    """LeCAM regulariser (Tseng et al. 2021): pulls discriminator outputs towards EMAs of the other
    side's mean output. The EMAs are buffers so they travel with checkpoints."""

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        with torch.no_grad():
            self.ema_real.lerp_(real_logits.mean().float(), 1 - self.decay)
            self.ema_fake.lerp_(fake_logits.mean().float(), 1 - self.decay)
        return F.relu(real_logits - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - fake_logits).pow(2).mean()
