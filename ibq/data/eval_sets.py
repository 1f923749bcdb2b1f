"""The validation sets of the paper's table of pretrained tokenizers, for evaluation only: COCO val2017 and
ImageNet val. Preprocessing as image_folder's validation split (shorter side to the resolution, centre
crop, pixels in [-1, 1]). Unreadable files are skipped and counted. There is no training split, and
`seed` is accepted only because every data builder is called with one: these sets are fixed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ibq.data.image_folder import FolderVal, class_folder_images, image_files, readable_samples
from ibq.data.splits import DataSplits
from ibq.errors import UserError, check_positive_int

UNLABELLED = -1


def evaluation_set(root: str, split: str, layout: str, list_images: Callable[[Path], list[tuple[Path, int]]],
                   resolution: int, limit: int | None, num_workers: int, name: str) -> DataSplits:
    """The readable images that `list_images` finds in `<root>/<split>`, in its order, the first `limit` of them.
    `layout` says what a user should point data.root at."""
    if limit is not None:  # checked before scanning: a split can hold 50k files
        check_positive_int("data.limit", limit)
    root_path = Path(root).expanduser()
    split_dir = root_path / split
    if not split_dir.is_dir():
        problem = f"has no '{split}' folder" if root_path.is_dir() else "does not exist"
        raise UserError(f"data.root={root} {problem}: expected {layout}")
    samples = readable_samples(list_images(split_dir), root_path, split, layout)
    return DataSplits(None, FolderVal(samples[:limit], resolution), num_workers, name)


def coco_images(split_dir: Path) -> list[tuple[Path, int]]:
    return [(path, UNLABELLED) for path in image_files(split_dir)]


def imagenet_val_images(split_dir: Path) -> list[tuple[Path, int]]:
    """In file-name order whatever the layout, so that a limit picks the same images from both (and not the
    first classes)."""
    in_classes, loose = class_folder_images(split_dir), image_files(split_dir)
    if in_classes and loose:  # e.g. an interrupted valprep: either part alone would be a silent subset
        raise UserError(
            f"data.root={split_dir.parent}: '{split_dir.name}' holds both class folders and {len(loose)} loose "
            "image(s): expected one layout or the other"
        )
    return sorted(in_classes, key=lambda sample: sample[0].name) or [(path, UNLABELLED) for path in loose]


def build_coco_val(root: str, resolution: int, seed: int, split: str = "val2017", limit: int | None = None,
                   num_workers: int = 4, name: str = "coco") -> DataSplits:
    """`<root>/<split>/*.jpg` (COCO's val2017.zip unpacked; the annotations are not read), sorted by file name,
    unlabelled."""
    layout = f"<root>/{split}/<image>.jpg"
    return evaluation_set(root, split, layout, coco_images, resolution, limit, num_workers, name)


def build_imagenet_val(root: str, resolution: int, seed: int, split: str = "val", limit: int | None = None,
                       num_workers: int = 4, name: str = "imagenet") -> DataSplits:
    """`<root>/<split>/<wnid>/*.JPEG` as the usual valprep script sorts them (label: the class's index in sorted
    order), or the tarball's flat `<root>/<split>/*.JPEG` (unlabelled)."""
    layout = f"<root>/{split}/<wnid>/<image>.JPEG or <root>/{split}/<image>.JPEG"
    return evaluation_set(root, split, layout, imagenet_val_images, resolution, limit, num_workers, name)
