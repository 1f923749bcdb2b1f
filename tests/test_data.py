"""Datasets: held-out photo crops, position-addressed training samples, image folders."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ibq.data import PositionSampler, build_image_folder, build_photos
from ibq.data.image_folder import header_parses, load_resized
from ibq.data.pack import pack
from ibq.data.photos import PHOTOS, load_photo, scale_shorter_side, split_photos
from ibq.errors import UserError


@pytest.fixture(scope="module")
def photos():
    return build_photos(list(PHOTOS), shorter_side=192, resolution=64, val_crops_per_photo=2, seed=0)


def test_photos_are_rgb_in_range_with_a_fixed_validation_set(photos):
    assert len(photos.val) == 2 * len(PHOTOS)
    image, label = photos.val[0]
    assert image.shape == (3, 64, 64) and image.min() >= -1 and image.max() <= 1
    again = build_photos(list(PHOTOS), shorter_side=192, resolution=64, val_crops_per_photo=2, seed=123)
    assert torch.equal(again.val[5][0], photos.val[5][0])  # the validation set ignores the seed
    greyscale = photos.val[2 * PHOTOS.index("camera")][0]
    assert torch.equal(greyscale[0], greyscale[1]) and torch.equal(greyscale[1], greyscale[2])


def test_validation_crops_are_held_out_from_training():
    """Validation crops come from each photo's right-most strip; training regions stop before it."""
    split = split_photos(["astronaut", "coffee"], shorter_side=192, resolution=64, val_crops_per_photo=3)
    for index, name in enumerate(["astronaut", "coffee"]):
        photo = scale_shorter_side(load_photo(name), 192)
        assert torch.equal(split.train[index], photo[:, :, :-64])
        for crop in split.val_crops[3 * index : 3 * index + 3]:
            strip = photo[:, :, -64:]
            assert any(torch.equal(crop, strip[:, top : top + 64]) for top in range(strip.shape[1] - 63))


def test_training_samples_depend_only_on_seed_and_position(photos):
    first = photos.train[1234]
    assert torch.equal(first[0], photos.train[1234][0]) and first[1] == photos.train[1234][1]
    other_seed = build_photos(list(PHOTOS), shorter_side=192, resolution=64, val_crops_per_photo=2, seed=1)
    assert not torch.equal(other_seed.train[1234][0], first[0])


def test_resumed_loader_continues_the_same_stream(photos):
    batch = 4
    full = [b[0] for b in DataLoader(photos.train, batch_size=batch, sampler=PositionSampler(0, 6 * batch))]
    resumed = [b[0] for b in DataLoader(photos.train, batch_size=batch, sampler=PositionSampler(3 * batch, 6 * batch), num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed))


def test_every_photo_gives_training_and_validation_crops_at_the_paper_resolution():
    """model_scale=paper data=photos: 256-px crops from photos whose configured shorter side is 96."""
    names = ["astronaut", "coins", "text"]  # square, 303 x 384, 172 x 448: the smallest shipped
    split = split_photos(names, shorter_side=96, resolution=256, val_crops_per_photo=2)
    assert [min(region.shape[-2:]) for region in split.train] == [512, 717, 768]  # at least 2 x 256 each
    assert split.val_crops.shape == (6, 3, 256, 256) and split.val_labels.tolist() == [0, 0, 1, 1, 2, 2]
    crops = build_photos(names, shorter_side=96, resolution=256, val_crops_per_photo=1, seed=0).train
    assert {crops[position][1] for position in range(30)} == {0, 1, 2}
    assert crops[0][0].shape == (3, 256, 256)


def test_unknown_photo_is_refused():
    with pytest.raises(UserError, match="'nope', which scikit-image does not ship"):
        build_photos(["nope"], shorter_side=192, resolution=64, val_crops_per_photo=1, seed=0)


def test_image_folder_skips_corrupt_files_and_keeps_paper_preprocessing(image_folder: Path):
    splits = build_image_folder(str(image_folder), resolution=64, seed=0, num_workers=0)
    assert len(splits.train) == 6 and len(splits.val) == 4  # the corrupt file is skipped
    image, label = splits.train[0]
    assert image.shape == (3, 64, 64) and label in (0, 1)
    epoch_labels = sorted(splits.train[p][1] for p in range(6))
    assert epoch_labels == [0, 0, 0, 1, 1, 1]  # one epoch visits every image once
    val_image, _ = splits.val[0]
    assert torch.equal(val_image, splits.val[0][0])


def test_image_folder_errors_name_the_root(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        build_image_folder(str(tmp_path / "missing"), resolution=64, seed=0)
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="has no 'val' folder|holds no images"):
        build_image_folder(str(tmp_path / "only_train"), resolution=64, seed=0)
    broken = tmp_path / "broken"
    for split in ("train", "val"):
        (broken / split / "a").mkdir(parents=True)
        (broken / split / "a" / "x.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="all unreadable"):
        build_image_folder(str(broken), resolution=64, seed=0)


def bomb_png(path: Path, width: int = 15000, height: int = 12200) -> Path:
    """A PNG whose header declares 183 megapixels, above Pillow's decompression-bomb limit: Image.open
    refuses it before decoding, so its (empty) pixel data never matters."""
    def chunk(kind: bytes, content: bytes) -> bytes:
        return struct.pack(">I", len(content)) + kind + content + struct.pack(">I", zlib.crc32(kind + content))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_skipped_with_a_warning_that_names_it(image_folder: Path, tmp_path: Path, caplog):
    bomb = bomb_png(image_folder / "train" / "cat" / "huge.png")
    with caplog.at_level(logging.WARNING):
        assert not header_parses(bomb)
        assert load_resized(io.BytesIO(bomb.read_bytes()), 32, name="shard-000003.tar#huge") is None
        splits = build_image_folder(str(image_folder), resolution=64, seed=0, num_workers=0)
        manifest = pack(str(image_folder / "train"), tmp_path / "shards", samples_per_shard=4)
    assert len(splits.train) == 6  # the bomb and the corrupt file are skipped, the photos kept
    assert manifest["samples"] == 6 and str(bomb) in manifest["skipped_files"]
    warnings = [record.getMessage() for record in caplog.records if "decompression bomb" in record.getMessage()]
    assert any(str(bomb) in line for line in warnings) and any("shard-000003.tar#huge" in line for line in warnings), warnings


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path):
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    Image.fromarray((ramp // 257).astype(np.uint8)).save(tmp_path / "grey8.png")
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode in ("I;16", "I")  # 16-bit samples (Pillow 10.0 opens them as 32-bit I)
    wide, narrow = load_resized(tmp_path / "grey16.png", 48), load_resized(tmp_path / "grey8.png", 48)
    assert wide.shape == narrow.shape == (3, 48, 64)
    assert wide.min() == -1 and wide.max() == 1
    torch.testing.assert_close(wide, narrow, atol=2 / 255, rtol=0)
