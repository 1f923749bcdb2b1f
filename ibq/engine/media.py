"""Image grids of a run's media/ folder, written to a temporary name and renamed (removed on failure)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ibq.runs.record import atomic_write


def save_grid(images: Tensor, path: Path, nrow: int) -> None:
    """A PNG of images in [-1, 1]; small images are enlarged (nearest) so the grid can be seen."""
    import torchvision  # here, not at import: it loads torch._dynamo, seconds of every app's start otherwise

    images = torch.nn.functional.interpolate(images, scale_factor=max(1, 128 // images.shape[-1]), mode="nearest")
    atomic_write(path, lambda tmp: torchvision.utils.save_image((images + 1) / 2, tmp, nrow=nrow, format="png"))
