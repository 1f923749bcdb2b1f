"""Image folders in ImageNet layout (`<root>/<split>/<class>/<image>`), with the paper's
preprocessing: shorter side to the resolution, random crop for training, centre crop for validation,
no flip, pixels in [-1, 1]. Unreadable files are skipped and counted; only an all-corrupt set is fatal.
An image above Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, ~179 megapixels at twice the
limit) is skipped like an unreadable one, with a warning that names it. 16-bit grey images are scaled
to the 8-bit range, not clipped."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from ibq.data.positions import position_generator, random_crop
from ibq.data.splits import DataSplits
from ibq.errors import UserError, check_positive_int

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}
# Pillow's modes for 16-bit grey (PNG, TIFF; "I" is how older Pillows open 16-bit PNGs): convert("RGB")
# clips their values at 255, so they are scaled from [0, 65535] instead.
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def image_files(folder: Path) -> list[Path]:
    """The image files directly inside `folder`, sorted by name."""
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)


def header_parses(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.size  # the header must parse
    except Image.DecompressionBombError as error:
        log.warning("skipping %s: %s", path, error)
        return False
    except (UnidentifiedImageError, OSError):
        return False
    return True


def pixels(image: Image.Image) -> Tensor:
    """An image as a float (3, H, W) tensor in [-1, 1]; 16-bit grey scaled, not clipped."""
    if image.mode in SIXTEEN_BIT_MODES:
        grey = torch.from_numpy(np.asarray(image).astype(np.float32)).clamp_(0, 65535) / 32767.5 - 1.0
        return grey.expand(3, -1, -1)
    return TF.pil_to_tensor(image.convert("RGB")).float() / 127.5 - 1.0


def readable_samples(candidates: list[tuple[Path, int]], root: Path, split: str, layout: str) -> list[tuple[Path, int]]:
    """The (file, label) candidates whose image header parses. Unreadable files are skipped and counted in one
    warning; none left is an error that names the expected `layout`."""
    samples = [(path, label) for path, label in candidates if header_parses(path)]
    corrupt = len(candidates) - len(samples)
    if corrupt:
        log.warning("skipped %d unreadable image file(s) under %s", corrupt, root / split)
    if not samples:
        what = f"{corrupt} file(s), all unreadable" if corrupt else "no images"
        raise UserError(f"data.root={root}: '{split}' holds {what} (expected {layout})")
    return samples


def class_folder_images(split_dir: Path) -> list[tuple[Path, int]]:
    """(file, class index) of the images in the class folders of `split_dir`, classes sorted by name."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    return [(path, label) for label, name in enumerate(classes) for path in image_files(split_dir / name)]


def scan_split(root: Path, split: str) -> list[tuple[Path, int]]:
    """[(file, class index)] of the readable images of `root/split`, classes in sorted order."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise UserError(f"data.root={root} has no '{split}' folder: expected {root}/{split}/<class>/<image>")
    return readable_samples(class_folder_images(split_dir), root, split, f"{split}/<class>/<image>.jpg|png")


def load_resized(file: Path | BinaryIO, resolution: int, name: str | None = None) -> Tensor | None:
    """Shorter side to `resolution`, as float in [-1, 1]; None (and a warning naming `name`, else the
    file) when it cannot be decoded."""
    try:
        with Image.open(file) as image:
            tensor = pixels(image)
    except Image.DecompressionBombError as error:
        log.warning("skipping image %s: %s", name or file, error)
        return None
    except (UnidentifiedImageError, OSError):
        log.warning("skipping unreadable image %s", name or file)
        return None
    return TF.resize(tensor, resolution, antialias=True).clamp(-1, 1)


class FolderTrain(Dataset):
    """Item `position`: epoch = position // N, a per-epoch permutation, then a random crop seeded by
    the position."""

    def __init__(self, samples: list[tuple[Path, int]], resolution: int, seed: int):
        self.samples, self.resolution, self.seed = samples, resolution, seed

    def __len__(self) -> int:
        return len(self.samples)

    @lru_cache(maxsize=2)
    def permutation(self, epoch: int) -> Tensor:
        return torch.randperm(len(self.samples), generator=position_generator(self.seed, -1 - epoch))

    def __getitem__(self, position: int) -> tuple[Tensor, int]:
        epoch, offset = divmod(position, len(self.samples))
        order = self.permutation(epoch)
        for attempt in range(len(self.samples)):  # a file that fails to decode gives way to the next one
            path, label = self.samples[int(order[(offset + attempt) % len(order)])]
            image = load_resized(path, self.resolution)
            if image is not None:
                break
        else:
            raise UserError(f"no image under {path.parent.parent} could be decoded")
        return random_crop(image, self.resolution, position_generator(self.seed, position)).contiguous(), label


class FolderVal(Dataset):
    def __init__(self, samples: list[tuple[Path, int]], resolution: int):
        self.samples, self.resolution = samples, resolution

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        image = load_resized(path, self.resolution)
        if image is None:  # keep the validation set fixed: a failing file is a black image, and logged
            image = torch.full((3, self.resolution, self.resolution), -1.0)
        return TF.center_crop(image, self.resolution), label


def build_image_folder(
    root: str,
    resolution: int,
    seed: int,
    train_split: str = "train",
    val_split: str = "val",
    val_limit: int | None = None,
    num_workers: int = 4,
) -> DataSplits:
    if val_limit is not None:  # checked before the folders are scanned
        check_positive_int("data.val_limit", val_limit)
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise UserError(f"data.root={root} does not exist: point it at a folder with train/<class>/ and val/<class>/")
    train_samples = scan_split(root_path, train_split)
    val_samples = scan_split(root_path, val_split)[:val_limit]
    return DataSplits(FolderTrain(train_samples, resolution, seed), FolderVal(val_samples, resolution), num_workers,
                      num_classes=max(label for _, label in train_samples) + 1)
