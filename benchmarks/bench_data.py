"""Loader throughput from tar shards vs from the same images in a folder, at the tiny resolution, and
whether the shard loader keeps the tiny training step fed.

Writes `images` JPEG photo crops (ImageNet-like sizes, two class folders) to a temporary folder, packs
them with `ibq-data pack`, then in one run: images/s of each loader over the same number of batches,
and the tiny tokenizer trained from the shards (the real main job) with its logged data-wait share.
Run from the repository root: python -m benchmarks.bench_data [images] [workers] [train_steps]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata
from torch.utils.data import DataLoader

from benchmarks.arguments import at_least
from benchmarks.bench_train import logged_throughput, timed_training_args
from ibq.data import build_image_folder, build_shards
from ibq.data.pack import pack
from ibq.data.positions import PositionSampler

RESOLUTION, BATCH = 32, 8


def write_folder(root: Path, images: int) -> None:
    """JPEG crops of 300-500 px on a side, as ImageNet's are, in train/ and a small val/."""
    rng = np.random.default_rng(0)
    photos = {"cat": skdata.chelsea(), "coffee": skdata.coffee(), "astronaut": skdata.astronaut()}
    for split, count in (("train", images), ("val", 2)):
        for index in range(count):
            name = list(photos)[index % len(photos)]
            photo = photos[name]
            scale = rng.uniform(1.1, 1.6)
            resized = Image.fromarray(photo).resize((int(photo.shape[1] * scale), int(photo.shape[0] * scale)))
            left, top = int(rng.integers(0, resized.width - 300)), int(rng.integers(0, resized.height - 300))
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            resized.crop((left, top, left + 300, top + 300)).save(folder / f"{index:06d}.jpg", quality=90)


def rate(batches, count: int) -> float:
    next(batches)  # workers started, first batch in
    started = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * BATCH / (time.perf_counter() - started)


def main(images: int = 2000, workers: int = 2, train_steps: int = 150) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "images", Path(tmp) / "shards"
        write_folder(folder, images)
        pack(str(folder / "train"), shards, samples_per_shard=100)
        batches = images // BATCH - 2

        from_folder = build_image_folder(str(folder), RESOLUTION, seed=0, num_workers=workers)
        folder_loader = DataLoader(from_folder.train, batch_size=BATCH, sampler=PositionSampler(0, images), num_workers=workers)
        folder_rate = rate(iter(folder_loader), batches)
        stream = build_shards(sources={"main": {"urls": str(shards)}}, resolution=RESOLUTION, seed=0, num_workers=workers,
                              val={"_target_": "ibq.data.build_shard_val", "urls": str(shards), "limit": 2}).train
        shard_rate = rate(stream.batches(BATCH, rank=0, world_size=1, state=None), batches)

        run_dir = Path(tmp) / "train"
        command = [sys.executable, "-m", "ibq.cli.train", "data=shards", f"data.sources.main.urls={shards}",
                   f"data.num_workers={workers}", "data.val.limit=16", *timed_training_args(train_steps),
                   f"hydra.run.dir={run_dir}"]
        subprocess.run(command, check=True, capture_output=True)
        train_rate, wait_share = logged_throughput(run_dir)
    print(f"loader_folder_images_per_s: {folder_rate:.1f}")
    print(f"loader_shards_images_per_s: {shard_rate:.1f}")
    print(f"loader_shards_over_folder: {shard_rate / folder_rate:.3f}")
    print(f"tiny_train_from_shards_images_per_s: {train_rate:.1f}")
    print(f"tiny_train_from_shards_data_wait_share: {wait_share:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Each loader is timed over images / 8 - 2 batches after its first.
    parser.add_argument("images", nargs="?", type=at_least(3 * BATCH), default=2000, help="JPEGs written and packed")
    parser.add_argument("workers", nargs="?", type=at_least(0), default=2, help="loader workers")
    parser.add_argument("train_steps", nargs="?", type=at_least(2), default=150, help="steps of the training from shards")
    args = parser.parse_args()
    main(args.images, args.workers, args.train_steps)
