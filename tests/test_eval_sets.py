"""COCO val2017 and ImageNet val as `data=` entries of ibq-eval: the paper's preprocessing, both ImageNet
layouts, one-line errors, and a run evaluated on both sets keeping both sets' numbers for the table."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos
from torchvision import transforms

from conftest import error_line, run_cli
from ibq.cli.sweep import main as ibq_sweep
from ibq.data.eval_sets import UNLABELLED, build_coco_val, build_imagenet_val
from ibq.errors import UserError
from ibq.metrics.adm import save_adm_npz
from ibq.metrics.reference import reference_key
from test_eval import evaluate_in_process, run_files, stand_in_fid  # noqa: F401 (stand_in_fid: a fixture)

RESOLUTION = 32  # the tiny model scale's, at which small_tokenizer_run is trained
CORRUPT = b"not an image"
# Photos of different sizes and aspect ratios (one greyscale, one smaller than the resolution), by file name.
COCO_FILES = {
    "000000000139.jpg": photos.chelsea(),  # landscape 300 x 451
    "000000000285.png": photos.astronaut()[:300, 100:280],  # portrait
    "000000000632.jpg": photos.camera()[100:124, 200:240],  # greyscale, 24 px: scaled up
    "000000000724.jpg": CORRUPT,
}
IMAGENET_FILES = {  # wnid folder -> file name -> image; file-name order interleaves the classes
    "n02123045": {"ILSVRC2012_val_00000001.JPEG": photos.chelsea(), "ILSVRC2012_val_00000004.JPEG": CORRUPT},
    "n07930864": {"ILSVRC2012_val_00000002.JPEG": photos.coffee(), "ILSVRC2012_val_00000003.png": photos.rocket()},
}
TABLE_METRICS = ["coco/rfid", "coco/psnr", "coco/ssim", "imagenet/rfid", "imagenet/psnr", "imagenet/ssim"]


def write_images(folder: Path, files: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            Image.fromarray(np.ascontiguousarray(content)).save(folder / name, format="PNG" if name.endswith(".png") else "JPEG")


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    write_images(root / "val2017", COCO_FILES)
    (root / "val2017" / "LICENSE.txt").write_text("not an image: ignored")
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text("{}")
    return root


@pytest.fixture
def imagenet_roots(tmp_path: Path) -> dict[str, Path]:
    """The same images in valprep's class folders and in the tarball's flat folder."""
    roots = {"classes": tmp_path / "imagenet", "flat": tmp_path / "imagenet_flat"}
    for wnid, files in IMAGENET_FILES.items():
        write_images(roots["classes"] / "val" / wnid, files)
        write_images(roots["flat"] / "val", files)
    return roots


@pytest.fixture
def run_copy(small_tokenizer_run: Path, tmp_path: Path) -> Path:
    """A private copy of the session's trained run, alone in a folder that `ibq-sweep table` can read."""
    copy = tmp_path / "runs" / "run"
    shutil.copytree(small_tokenizer_run, copy)
    return copy


def paper_preprocessing(path: Path) -> torch.Tensor:
    """torchvision's Resize (shorter side) and CenterCrop of the file, in [-1, 1]."""
    crop = transforms.Compose([transforms.Resize(RESOLUTION), transforms.CenterCrop(RESOLUTION), transforms.PILToTensor()])
    with Image.open(path) as image:
        return crop(image.convert("RGB")).float() / 127.5 - 1


def assert_paper_preprocessing(image: torch.Tensor, path: Path) -> None:
    assert image.shape == (3, RESOLUTION, RESOLUTION) and image.min() >= -1 and image.max() <= 1
    # PIL rounds its resized pixels to 8 bits, ours stay float: the two agree within one 8-bit level
    assert (image - paper_preprocessing(path)).abs().max() <= 1.01 / 127.5


# ------------------------------------------------------------------------------------------------------ builders


def test_coco_val_is_its_readable_images_in_file_name_order(coco_root: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="ibq.data.image_folder"):
        splits = build_coco_val(str(coco_root), RESOLUTION, seed=0, num_workers=0)
    assert "skipped 1 unreadable image file(s)" in caplog.text
    assert splits.train is None and splits.name == "coco" and splits.num_workers == 0
    readable = sorted(name for name, content in COCO_FILES.items() if content is not CORRUPT)
    assert len(splits.val) == len(readable)
    for index, name in enumerate(readable):
        image, label = splits.val[index]
        assert label == UNLABELLED
        assert_paper_preprocessing(image, coco_root / "val2017" / name)

    first_two = build_coco_val(str(coco_root), RESOLUTION, seed=0, limit=2, num_workers=0)
    assert len(first_two.val) == 2 and torch.equal(first_two.val[1][0], splits.val[1][0])


def test_imagenet_val_class_folders_and_flat_folder_give_the_same_images(imagenet_roots: dict[str, Path]):
    in_classes = build_imagenet_val(str(imagenet_roots["classes"]), RESOLUTION, seed=0, num_workers=0)
    flat = build_imagenet_val(str(imagenet_roots["flat"]), RESOLUTION, seed=0, num_workers=0)
    assert in_classes.train is None and in_classes.name == "imagenet"
    # file-name order across the classes: 00000001 (n02123045), 00000002 and 00000003 (n07930864)
    assert [in_classes.val[i][1] for i in range(3)] == [0, 1, 1] and len(in_classes.val) == 3
    assert [flat.val[i][1] for i in range(3)] == [UNLABELLED] * 3 and len(flat.val) == 3
    for index, name in enumerate(["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000003.png"]):
        assert torch.equal(in_classes.val[index][0], flat.val[index][0])
        assert_paper_preprocessing(flat.val[index][0], imagenet_roots["flat"] / "val" / name)

    first_two = build_imagenet_val(str(imagenet_roots["classes"]), RESOLUTION, seed=0, limit=2, num_workers=0)
    assert [first_two.val[i][1] for i in range(len(first_two.val))] == [0, 1]  # not the first class's images


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("coco_missing_root", "data.root={root} does not exist: expected <root>/val2017/<image>.jpg"),
        ("coco_empty", "data.root={root}: 'val2017' holds no images (expected <root>/val2017/<image>.jpg)"),
        ("coco_all_corrupt", "'val2017' holds 1 file(s), all unreadable"),
        ("coco_limit_0", "data.limit=0 is invalid: it must be a positive integer"),
        ("imagenet_no_val", "data.root={root} has no 'val' folder: expected <root>/val/<wnid>/<image>.JPEG or <root>/val/<image>.JPEG"),
        ("imagenet_mixed", "'val' holds both class folders and 1 loose image(s): expected one layout or the other"),
    ],
)
def test_bad_folders_and_limits_are_one_line(tmp_path: Path, case: str, expected: str):
    root = tmp_path / "data"
    build = build_coco_val if case.startswith("coco") else build_imagenet_val
    if case == "coco_empty":
        (root / "val2017").mkdir(parents=True)
    elif case == "coco_all_corrupt":
        write_images(root / "val2017", {"000000000724.jpg": CORRUPT})
    elif case == "coco_limit_0":
        write_images(root / "val2017", {"000000000139.jpg": photos.chelsea()})
    elif case == "imagenet_no_val":
        root.mkdir()
    elif case == "imagenet_mixed":  # an interrupted valprep
        write_images(root / "val" / "n02123045", {"ILSVRC2012_val_00000001.JPEG": photos.chelsea()})
        write_images(root / "val", {"ILSVRC2012_val_00000002.JPEG": photos.coffee()})
    with pytest.raises(UserError) as raised:
        build(str(root), RESOLUTION, seed=0, limit=0 if case == "coco_limit_0" else None, num_workers=0)
    assert expected.format(root=root) in str(raised.value) and "\n" not in str(raised.value)


def test_the_name_does_not_change_the_reference_statistics_key(coco_root: Path):
    config = {"_target_": "ibq.data.eval_sets.build_coco_val", "root": str(coco_root), "resolution": RESOLUTION,
              "split": "val2017", "limit": None}
    named = reference_key({**config, "name": "coco", "num_workers": 4}, "val", None, 0, "0" * 40)
    assert named == reference_key(config, "val", None, 0, "0" * 40)
    assert named.filename().startswith(f"coco_val-val-{RESOLUTION}px-")
    assert named != reference_key({**config, "limit": 2}, "val", None, 0, "0" * 40)


# --------------------------------------------------------------------------------------------------------- ibq-eval


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data=coco_val"], "data.root is not set: add data.root=<value> to the command line"),
        (["data=coco_val", "data.root={tmp}/empty"], "'val2017' holds no images"),
        (["data=imagenet_val", "data.root={coco}"], "has no 'val' folder"),
        (["data=coco_val", "data.root={coco}", "data.limit=-1"], "data.limit=-1 is invalid"),
        (["samples={tmp}/samples.npz", "data=coco_val", "data.root={coco}", "reference.split=train", "metrics.is=false"],
         "reference.split=train: coco_val:{coco} has no such split; valid: val"),
    ],
)
def test_eval_rejects_bad_input_in_one_line_and_writes_nothing(run_copy: Path, coco_root: Path, tmp_path: Path, stand_in_fid,
                                                               overrides: list[str], expected: str):
    (tmp_path / "empty" / "val2017").mkdir(parents=True)
    save_adm_npz(tmp_path / "samples.npz", np.zeros((4, RESOLUTION, RESOLUTION, 3), dtype=np.uint8))
    cache = tmp_path / "cache"
    args = [arg.format(tmp=tmp_path, coco=coco_root) for arg in overrides]
    before = run_files(run_copy)
    with pytest.raises(UserError) as raised:
        evaluate_in_process(f"run_dir={run_copy}", f"reference.cache_dir={cache}", "metrics.lpips=[]", *args)
    assert expected.format(coco=coco_root) in str(raised.value) and "\n" not in str(raised.value)
    assert run_files(run_copy) == before and not cache.exists()


@pytest.mark.slow
def test_eval_cli_without_a_root_is_one_line(run_copy: Path):
    line = error_line(run_cli([sys.executable, "-m", "ibq.cli.eval", f"run_dir={run_copy}", "data=coco_val"]))
    assert line == "error: data.root is not set: add data.root=<value> to the command line"


@pytest.mark.slow
def test_a_run_evaluated_on_coco_then_imagenet_keeps_both_for_the_table(
    run_copy: Path, coco_root: Path, imagenet_roots: dict[str, Path], tmp_path: Path, stand_in_fid, capsys
):
    cache = tmp_path / "cache"
    common = [f"run_dir={run_copy}", f"reference.cache_dir={cache}", "metrics.lpips=[]", "wandb_mode=disabled", "data.num_workers=0"]
    coco_lines = evaluate_in_process(*common, "data=coco_val", f"data.root={coco_root}")
    assert f"on coco_val:{coco_root} val (3 images)" in coco_lines[0]
    coco = json.loads((run_copy / "results.json").read_text())
    evaluate_in_process(*common, "data=imagenet_val", f"data.root={imagenet_roots['classes']}")
    results = json.loads((run_copy / "results.json").read_text())

    for name in ("coco", "imagenet"):
        assert results[f"{name}/images"] == 3 and results[f"{name}/rfid/samples"] == 3
        assert all(isinstance(results[f"{name}/{metric}"], float) for metric in ("rfid", "psnr", "ssim", "codebook/utilization"))
    assert {key: results[key] for key in coco if key.startswith("coco/")} == {key: coco[key] for key in coco if key.startswith("coco/")}
    assert results["psnr"] == results["imagenet/psnr"] != results["coco/psnr"]  # unprefixed: the latest evaluation
    assert results["eval/dataset"] == f"imagenet_val:{imagenet_roots['classes']}"
    assert {path.name.split("-")[0] for path in cache.glob("*.npz")} == {"coco_val", "imagenet_val"}

    with pytest.raises(SystemExit) as exited:
        ibq_sweep(["table", str(run_copy.parent), "--metrics", ",".join(TABLE_METRICS)])
    assert exited.value.code == 0
    header, _, row = capsys.readouterr().out.splitlines()[1:4]
    assert header.split() == ["runs", "coco", "rFID", "coco", "PSNR", "coco", "SSIM", "imagenet", "rFID", "imagenet", "PSNR", "imagenet", "SSIM"]
    digits = {"rfid": 2, "psnr": 2, "ssim": 4}
    assert row.split() == ["1"] + [f"{results[metric]:.{digits[metric.split('/')[1]]}f}" for metric in TABLE_METRICS]
