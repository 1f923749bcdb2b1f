"""The embedded dataset: photos bundled inside scikit-image, so a run needs no download.

Each photo is scaled so its shorter side is `shorter_side`, or 3 x `resolution` where that is larger.
Its right-most `resolution` columns are held out: validation crops come from that strip at fixed
positions, training crops from the rest (at least 2 x `resolution` wide) at random positions, so every
photo serves both at any resolution. The class of a crop is the photo it came from."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ibq.data.positions import position_generator, random_crop
from ibq.data.splits import DataSplits
from ibq.errors import UserError

log = logging.getLogger(__name__)
# The smallest shorter side, in resolutions: a validation strip plus a training region twice as wide.
SIDES_PER_RESOLUTION = 3

PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "stereo_motorcycle", "camera", "brick", "grass", "gravel", "coins", "moon", "page", "text", "clock", "cell",
)


def load_photo(name: str) -> np.ndarray:
    """HxWx3 uint8; greyscale photos are repeated over three channels."""
    from skimage import data as skdata

    loader = getattr(skdata, name, None)
    if loader is None:
        raise UserError(f"data.photos contains {name!r}, which scikit-image does not ship; valid: {', '.join(PHOTOS)}")
    image = loader()
    if isinstance(image, tuple):  # stereo pairs: the left view
        image = image[0]
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def scale_shorter_side(image: np.ndarray, shorter_side: int) -> Tensor:
    """uint8 HxWx3 -> float 3xH'xW' in [-1, 1] with min(H', W') == shorter_side."""
    tensor = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 127.5 - 1.0
    h, w = tensor.shape[-2:]
    scale = shorter_side / min(h, w)
    size = (max(shorter_side, round(h * scale)), max(shorter_side, round(w * scale)))
    return F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(-1, 1)


@dataclass
class PhotoSplit:
    train: list[Tensor]  # regions that training crops come from
    val_crops: Tensor  # (N, 3, R, R)
    val_labels: Tensor  # (N,)


def split_photos(names: list[str], shorter_side: int, resolution: int, val_crops_per_photo: int) -> PhotoSplit:
    side = max(shorter_side, SIDES_PER_RESOLUTION * resolution)
    if side > shorter_side:
        log.info("photos scaled to a shorter side of %d px, not data.shorter_side=%d: at data.resolution=%d each needs a "
                 "validation strip and training crops beside it", side, shorter_side, resolution)
    photos = [scale_shorter_side(load_photo(name), side) for name in names]
    train, crops, labels = [], [], []
    for label, photo in enumerate(photos):
        height, width = photo.shape[-2:]
        train.append(photo[:, :, : width - resolution])
        strip = photo[:, :, width - resolution :]
        for top in np.linspace(0, height - resolution, val_crops_per_photo).round().astype(int):
            crops.append(strip[:, top : top + resolution])
            labels.append(label)
    return PhotoSplit(train, torch.stack(crops), torch.tensor(labels))


class PhotoCrops(Dataset):
    """Random training crops; item `position` is a pure function of (seed, position), so a resumed
    run sees exactly the crops an uninterrupted one would."""

    def __init__(self, regions: list[Tensor], resolution: int, seed: int):
        self.regions = regions  # each at least resolution x 2 resolution
        self.resolution = resolution
        self.seed = seed

    def __len__(self) -> int:
        return sum(
            (r.shape[-2] - self.resolution + 1) * (r.shape[-1] - self.resolution + 1) for r in self.regions
        )

    def __getitem__(self, position: int) -> tuple[Tensor, int]:
        generator = position_generator(self.seed, position)
        choice = int(torch.randint(len(self.regions), (1,), generator=generator))
        return random_crop(self.regions[choice], self.resolution, generator).contiguous(), choice


class TensorImages(Dataset):
    def __init__(self, images: Tensor, labels: Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


def build_photos(
    photos: list[str], shorter_side: int, resolution: int, val_crops_per_photo: int, seed: int, num_workers: int = 0
) -> DataSplits:
    split = split_photos(list(photos), shorter_side, resolution, val_crops_per_photo)
    return DataSplits(PhotoCrops(split.train, resolution, seed), TensorImages(split.val_crops, split.val_labels), num_workers,
                      num_classes=len(split.train))  # a crop's label is its photo
