"""Shard sets: packing, streaming with exact resume, disjoint ranks, mixes, and what bad shards do."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from omegaconf import OmegaConf
from skimage import data as skdata

from conftest import BackgroundRun, error_line, kill_at_first_checkpoint, read_jsonl, run_cli, train, train_args
from ibq.data.batches import indexed_train
from ibq.data.pack import inspect_shards, pack
from ibq.data.shards import build_shards, list_shards
from ibq.errors import UserError

IBQ_DATA = [sys.executable, "-m", "ibq.cli.data"]
IMAGES, PER_SHARD = 40, 5


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """40 photo crops of varied sizes in two class folders, with a caption beside each cat."""
    root = tmp_path_factory.mktemp("folder") / "images"
    photos = {"cat": skdata.chelsea(), "coffee": skdata.coffee()}
    for name, photo in photos.items():
        (root / name).mkdir(parents=True)
        for i in range(IMAGES // 2):
            crop = np.ascontiguousarray(photo[i * 7 : i * 7 + 48 + i, i * 9 : i * 9 + 40 + 2 * i])
            Image.fromarray(crop).save(root / name / f"{name}_{i:02d}.png")
            if name == "cat":
                (root / name / f"{name}_{i:02d}.txt").write_text(f"a cat, crop {i}")
    return root


@pytest.fixture(scope="module")
def shard_set(photo_folder: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("shards") / "set"
    pack(str(photo_folder), output, samples_per_shard=PER_SHARD)
    return output


def stream(urls, val_urls=None, **settings):
    options = dict(resolution=16, seed=0, shuffle_shards=2, shuffle_buffer=3, num_workers=2)
    options.update(settings)
    sources = urls if isinstance(urls, dict) else {"main": {"urls": str(urls), "weight": 1.0}}
    val = {"_target_": "ibq.data.build_shard_val", "urls": str(val_urls or next(iter(sources.values()))["urls"]), "limit": 4}
    return build_shards(sources=sources, val=val, **options).train


def take_keys(batches, count: int) -> list[str]:
    keys = []
    for _ in range(count):
        batch = batches.next_batch()
        assert batch["images"].shape[1:] == (3, 16, 16) and batch["images"].abs().max() <= 1
        keys += batch["keys"]
    return keys


def test_pack_writes_shards_and_a_manifest_that_inspect_agrees_with(shard_set: Path, photo_folder: Path):
    manifest = json.loads((shard_set / "manifest.json").read_text())
    assert manifest["samples"] == IMAGES and manifest["shard_count"] == IMAGES // PER_SHARD
    assert manifest["classes"] == ["cat", "coffee"]
    with tarfile.open(shard_set / manifest["shards"][0]["name"]) as tar:
        names = tar.getnames()
    assert sorted(names[:4]) == ["000000000.cls", "000000000.json", "000000000.png", "000000000.txt"]
    first = (photo_folder / "cat" / "cat_00.png").read_bytes()
    with tarfile.open(shard_set / manifest["shards"][0]["name"]) as tar:
        assert tar.extractfile("000000000.png").read() == first  # the file's own bytes
    lines, problems = inspect_shards(str(shard_set), show=2, verify=True)
    assert problems == []
    assert lines[0].startswith(f"{shard_set}: 8 shard(s), 40 sample(s)")
    assert "(agrees)" in lines[1] and "all 8 match" in lines[2]
    assert lines[3].endswith('class 0 "a cat, crop 0"')


def test_packed_folder_has_the_mode_the_umask_allows(photo_folder: Path, tmp_path: Path):
    previous = os.umask(0o022)
    try:
        pack(str(photo_folder / "cat"), tmp_path / "cats", samples_per_shard=10)
    finally:
        os.umask(previous)
    assert (tmp_path / "cats").stat().st_mode & 0o777 == 0o755
    assert {path.stat().st_mode & 0o777 for path in (tmp_path / "cats").iterdir()} == {0o644}


def test_inspect_reports_a_lying_manifest_and_a_checksum_mismatch_and_fails(shard_set: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(shard_set, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["samples"] += 1
    manifest["shards"][1]["samples"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shard = copy / manifest["shards"][2]["name"]
    content = bytearray(shard.read_bytes())
    content[2000] ^= 0xFF  # inside the first image: the tar still reads
    shard.write_bytes(bytes(content))
    lines, problems = inspect_shards(str(copy), show=0, verify=True)
    assert problems == [f"the manifest says {IMAGES + 1} sample(s) in 8 shard(s), the shards hold {IMAGES} in 8 "
                        f"(other counts in {manifest['shards'][1]['name']})", f"sha256 mismatch in {shard.name}"]
    assert "DIFFERS from the shards" in lines[1] and f"MISMATCH in {shard.name}" in lines[2]
    result = run_cli(IBQ_DATA + ["inspect", str(copy), "--verify"])
    assert result.returncode == 1 and "DIFFERS" in result.stdout
    assert error_line(result) == f"error: {copy}: " + "; ".join(problems)


def test_pack_ends_shards_at_a_size(photo_folder: Path, tmp_path: Path):
    sizes = [path.stat().st_size for path in sorted(photo_folder.glob("*/*.png"))]
    limit = 3 * max(sizes)
    manifest = pack(str(photo_folder), tmp_path / "by_size", samples_per_shard=1000, max_shard_bytes=limit)
    assert manifest["shard_count"] > 1 and sum(shard["samples"] for shard in manifest["shards"]) == IMAGES
    assert all(shard["bytes"] <= limit + 10240 for shard in manifest["shards"])  # + tar's closing record
    assert all(shard["samples"] >= 2 for shard in manifest["shards"][:-1])  # 3 of the largest would pass the limit


def test_pack_refuses_an_existing_output_and_leaves_nothing_on_failure(shard_set: Path, tmp_path: Path):
    before = sorted(p.name for p in shard_set.iterdir())
    result = run_cli(IBQ_DATA + ["pack", "photos", str(shard_set)])
    assert error_line(result) == f"error: {shard_set} already exists and is not empty: give a new output folder"
    assert sorted(p.name for p in shard_set.iterdir()) == before
    (tmp_path / "empty").mkdir()
    result = run_cli(IBQ_DATA + ["pack", str(tmp_path / "empty"), str(tmp_path / "out")])
    assert "holds no image" in error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_pack_photos_and_inspect_from_the_command_line(tmp_path: Path, photo_shards: Path):
    result = run_cli(IBQ_DATA + ["pack", "photos", str(tmp_path / "photos"), "--samples-per-shard", "4"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"18 samples in 5 shard(s) -> {tmp_path / 'photos'}" in result.stdout
    checksums = [[shard["sha256"] for shard in json.loads((d / "manifest.json").read_text())["shards"]]
                 for d in (tmp_path / "photos", photo_shards)]
    assert checksums[0] == checksums[1]  # the same images give the same shards
    shown = run_cli(IBQ_DATA + ["inspect", str(tmp_path / "photos"), "--show", "1"])
    assert "5 shard(s), 18 sample(s)" in shown.stdout and '512x512 RGB class 0 "astronaut"' in shown.stdout


def test_an_epoch_is_each_sample_once_and_resuming_mid_epoch_continues_it(shard_set: Path):
    """Two loader workers, micro-batches of 5: one epoch is 8 batches. Interrupted after 3 and resumed
    from the state, the stream goes on exactly as the uninterrupted one."""
    source = stream(shard_set)
    uninterrupted = take_keys(source.batches(5, rank=0, world_size=1, state=None), 8)
    assert len(uninterrupted) == IMAGES and len(set(uninterrupted)) == IMAGES

    first = source.batches(5, rank=0, world_size=1, state=None)
    before = take_keys(first, 3)
    state = torch.load(io.BytesIO(save(first.state())), weights_only=True)  # as it goes through a checkpoint
    after = take_keys(stream(shard_set).batches(5, rank=0, world_size=1, state=state), 5)
    assert before + after == uninterrupted
    assert Counter(before + after) == Counter({key: 1 for key in uninterrupted})


def save(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_urls_are_read_through_webdatasets_openers(shard_set: Path):
    urls = [f"pipe:cat {path}" for path in sorted(shard_set.glob("*.tar"))]
    keys = take_keys(stream({"main": {"urls": urls, "weight": 1.0}}, shard_set).batches(5, 0, 1, None), 8)
    assert len(set(keys)) == IMAGES and all(key.startswith("pipe:cat ") for key in keys)


def test_the_next_epoch_is_reshuffled(shard_set: Path):
    batches = stream(shard_set).batches(5, rank=0, world_size=1, state=None)
    epochs = take_keys(batches, 8), take_keys(batches, 8)
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]


def test_two_ranks_read_disjoint_samples_that_cover_the_epoch(shard_set: Path):
    ranks = [take_keys(stream(shard_set).batches(5, rank=r, world_size=2, state=None), 4) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(take_keys(stream(shard_set).batches(5, 0, 1, None), 8))


def test_resuming_with_another_slot_layout_is_refused(shard_set: Path):
    batches = stream(shard_set).batches(5, rank=0, world_size=1, state=None)
    take_keys(batches, 1)
    with pytest.raises(UserError, match=r"read by 2 loader slots .* this job reads it with 1 \(1 rank\(s\) x 1\)"):
        stream(shard_set, num_workers=1).batches(5, rank=0, world_size=1, state=batches.state())


def test_fewer_shards_than_ranks_is_refused_and_than_workers_falls_back(shard_set: Path, caplog):
    with pytest.raises(UserError, match=r"data.sources.main has 8 shard\(s\), fewer than the 9 ranks"):
        stream(shard_set).batches(5, rank=0, world_size=9, state=None)
    with caplog.at_level(logging.WARNING):
        batches = stream(shard_set, num_workers=3).batches(5, rank=0, world_size=4, state=None)
    assert "fewer than 4 rank(s) x 3 loader workers: using 2 worker(s) per rank" in caplog.text
    assert batches.slots == 8


def test_a_mix_draws_sources_by_weight(shard_set: Path, photo_folder: Path, tmp_path: Path):
    photos = tmp_path / "photos"
    pack("photos", photos, samples_per_shard=2)
    sources = {"folder": {"urls": str(shard_set), "weight": 3.0}, "photos": {"urls": str(photos), "weight": 1.0},
               "unused": {"urls": str(photos), "weight": 0}}
    keys = take_keys(stream(sources, num_workers=0, resolution=16).batches(10, 0, 1, None), 40)
    from_photos = sum(str(photos) in key for key in keys) / len(keys)
    assert from_photos == pytest.approx(0.25, abs=0.06)


@pytest.mark.parametrize(("weights", "expected"), [
    ({"a": -1.0, "b": 1.0}, "data.sources.a.weight=-1.0 is invalid: a sampling weight must be a number >= 0 or 'samples'"),
    ({"a": 0, "b": 0.0}, "data.sources: every weight is 0 (a, b): give at least one source a weight > 0"),
])
def test_negative_or_all_zero_weights_are_refused(shard_set: Path, weights: dict, expected: str):
    with pytest.raises(UserError) as error:
        stream({name: {"urls": str(shard_set), "weight": w} for name, w in weights.items()})
    assert str(error.value) == expected


def test_a_pattern_that_matches_nothing_is_refused(tmp_path: Path):
    pattern = str(tmp_path / "nowhere-{000000..000003}.tar")
    with pytest.raises(UserError, match=r"matches no shard \(.*nowhere-000000.tar does not exist\)"):
        list_shards("data.sources.main.urls", pattern)


def test_a_manifest_that_is_not_one_is_refused(tmp_path: Path):
    (tmp_path / "manifest.json").write_text('{"samples": 3}')
    with pytest.raises(UserError, match=r"data.sources.main.urls: .*manifest.json is not a shard manifest written by ibq-data pack"):
        list_shards("data.sources.main.urls", str(tmp_path))


def corrupted_copy(shard_set: Path, copy: Path, damaged: int) -> Path:
    """The shard set with its first `damaged` shards cut off in the middle of a file."""
    copy.mkdir()
    for index, shard in enumerate(sorted(shard_set.glob("*.tar"))):
        content = shard.read_bytes()
        (copy / shard.name).write_bytes(content[: len(content) // 2 + 100] if index < damaged else content)
    return copy


def test_truncated_shards_are_skipped_and_counted_until_their_share_is_too_high(shard_set: Path, tmp_path: Path, caplog):
    damaged = corrupted_copy(shard_set, tmp_path / "one", damaged=1)
    with caplog.at_level(logging.WARNING):
        batches = stream(damaged, shard_set, num_workers=0, max_corrupt_share=0.2).batches(5, 0, 1, None)
        keys = take_keys(batches, 7)
    assert batches.counters() == {"data/skipped_samples": 0, "data/unreadable_shards": 1}
    assert f"skipped the rest of unreadable shard {damaged / 'shard-000000.tar'}" in caplog.text
    assert "1 of this worker's 8 shards this epoch" in caplog.text
    assert len(set(keys)) == len(keys) == 35  # what the truncated shard held before the cut, then the other 7

    two_damaged = corrupted_copy(shard_set, tmp_path / "two", damaged=2)
    with pytest.raises(UserError, match=r"data.sources.main: 2 of a loader worker's 8 shards are unreadable "
                                         r"\(last: .*shard-00000[01].tar: .*\), more than data.max_corrupt_share=0.2"):
        take_keys(stream(two_damaged, shard_set, num_workers=0, max_corrupt_share=0.2).batches(5, 0, 1, None), 16)


def test_a_stalled_pipe_is_killed_after_the_read_timeout_and_counted_as_unreadable(shard_set: Path, caplog):
    shards = sorted(shard_set.glob("*.tar"))
    stalled = f"pipe:head -c 3000 {shards[0]} && exec sleep 60"  # some bytes, then nothing
    urls = [stalled] + [f"pipe:cat {path}" for path in shards[1:]]
    with caplog.at_level(logging.WARNING):
        batches = stream({"main": {"urls": urls, "weight": 1.0}}, shard_set, num_workers=0, max_corrupt_share=0.2,
                         read_timeout_s=0.5).batches(5, 0, 1, None)
        keys = take_keys(batches, 7)
    assert batches.counters() == {"data/skipped_samples": 0, "data/unreadable_shards": 1}
    assert f"skipped the rest of unreadable shard {stalled} (no data for 0.5 s (data.read_timeout_s))" in caplog.text
    assert len(set(keys)) == 35
    with pytest.raises(UserError, match=r"data.read_timeout_s=0 is invalid: seconds > 0"):
        stream(shard_set, read_timeout_s=0)


def test_an_image_that_does_not_decode_is_skipped_and_counted(shard_set: Path, tmp_path: Path):
    from webdataset import TarWriter

    (tmp_path / "set").mkdir()
    writer = TarWriter(str(tmp_path / "set" / "mixed.tar"), encoder=False)
    good = (shard_set / "shard-000000.tar", "000000000")
    with tarfile.open(good[0]) as tar:
        png = tar.extractfile(f"{good[1]}.png").read()
    for key, payload in (("a", png), ("broken", b"not a png"), ("b", png)):
        writer.write({"__key__": key, "png": payload})
    writer.close()
    batches = stream(tmp_path / "set", shard_set, num_workers=0, shuffle_buffer=1, shuffle_shards=1).batches(2, 0, 1, None)
    assert [key.rsplit("#", 1)[1] for key in take_keys(batches, 1)] == ["a", "b"]
    assert batches.counters() == {"data/skipped_samples": 1, "data/unreadable_shards": 0}


def test_a_sample_without_an_image_is_refused(shard_set: Path, tmp_path: Path):
    from webdataset import TarWriter

    folder = tmp_path / "captions"
    folder.mkdir()
    writer = TarWriter(str(folder / "only-text.tar"), encoder=False)
    writer.write({"__key__": "caption0", "txt": b"a caption without its image"})
    writer.close()
    with pytest.raises(UserError, match=r"sample 'caption0' of shard .*only-text.tar has no image \(it holds .txt\); "
                                         r"a sample needs one of .jpg"):
        take_keys(stream(folder, shard_set, num_workers=0).batches(1, 0, 1, None), 1)


@pytest.mark.slow
def test_tokenizer_trains_from_shards_and_a_killed_run_resumes_mid_epoch(shard_set: Path, tmp_path: Path):
    """Batch 8 from 2 loader workers: an epoch of the 40 samples is 5 steps. Killed after its first
    checkpoint and resumed, the run's losses and final stream position equal an uninterrupted run's."""
    settings = [f"data.sources.main.urls={shard_set}", "data=shards", "data.num_workers=2", "data.val.limit=8",
                "train.steps=8", "train.checkpoint_every=2", "eval.rfid=false"]
    reference = BackgroundRun(train_args(tmp_path / "reference", *settings))

    run_dir = tmp_path / "interrupted"
    killed_at = kill_at_first_checkpoint(train_args(run_dir, *settings), run_dir)
    assert killed_at < 5, "the run finished its first epoch before it could be killed"
    resumed = train(run_dir, *settings)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = reference.result()
    assert reference.returncode == 0, reference.stderr[-3000:]

    expected, actual = read_jsonl(tmp_path / "reference" / "metrics.jsonl"), read_jsonl(run_dir / "metrics.jsonl")
    assert [line["step"] for line in actual] == [line["step"] for line in expected]
    for a, b in zip(actual, expected):
        if "loss/g" in b:
            assert a["loss/g"] == pytest.approx(b["loss/g"], rel=1e-5), a["step"]
    final = [torch.load(d / "checkpoints" / "last.pt", weights_only=True)["data_stream"] for d in (tmp_path / "reference", run_dir)]
    assert final[0] == final[1] and final[0]["taken"] == 8
    assert json.loads((run_dir / "results.json").read_text())["eval/images"] == 8


@pytest.mark.slow
def test_evaluation_sets_and_shard_streams_are_refused_where_they_cannot_serve(shard_set: Path, tmp_path: Path, image_folder: Path):
    result = train(tmp_path / "run", "data=coco_val", f"data.root={image_folder / 'val'}", "data.split=cat")
    assert error_line(result) == ("error: data: ibq.data.eval_sets.build_coco_val is an evaluation set without training "
                                  "images: train on data=photos, image_folder, shards or pretrain_mix, and evaluate on it with ibq-eval")
    result = train(tmp_path / "run", "data=shards", "data.sources.main.urls=/nowhere")
    assert error_line(result).startswith("error: data.sources.main.urls='/nowhere' matches no shard (/nowhere does not exist)")
    result = train(tmp_path / "run", "data=shards")
    assert error_line(result) == "error: data.sources.main.urls is not set: add data.sources.main.urls=<value> to the command line"
    assert not (tmp_path / "run").exists()
    stream_splits = build_shards(sources={"main": {"urls": str(shard_set)}}, resolution=16, seed=0,
                                 val={"_target_": "ibq.data.build_shard_val", "urls": str(shard_set), "limit": 2})
    with pytest.raises(UserError, match="ibq-train-ar reads datasets with positions"):
        indexed_train(stream_splits, OmegaConf.create({"_target_": "ibq.data.build_shards"}), "ibq-train-ar")
