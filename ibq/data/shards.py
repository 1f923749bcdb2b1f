"""Training samples streamed from webdataset tar shards: one source, or a weighted mix of several.

How a stream is laid out. Each epoch, a source's shards are shuffled (seeded by seed and epoch) and
dealt to the job's slots, one slot per (rank, loader worker): slot s reads shards s, s+S, s+2S, ... of
that order, so ranks and workers read disjoint shards and together read every shard once per epoch. A
slot reads its shards `shuffle_shards` at a time, interleaving their samples at random and passing
them through a shuffle buffer that is emptied when the group ends. The group is the unit of replay: a
slot's position is (epoch, group, samples taken from the group), and a resumed run reads that group
again up to the position, without decoding, then goes on; it neither restarts the epoch nor repeats
a sample.

A mix draws each sample's source at random with the configured weights (a fixed function of seed,
slot and sample count); each source streams on its own and starts its next epoch when its shards of
the current one are read."""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import os
import random
import re
import select
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision.transforms import functional as TF

from ibq.config import build
from ibq.data.image_folder import load_resized
from ibq.data.positions import position_generator, random_crop
from ibq.data.splits import DataSplits
from ibq.errors import UserError, check_positive_int, unset_key

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
CROPS = ("random", "center")
# What a damaged, truncated or unreadable tar raises while it is read.
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)
# Seconds a shard read through a command (pipe:, and https:// etc., which webdataset reads through curl)
# may wait for its next bytes before the shard counts as unreadable (data.read_timeout_s).
READ_TIMEOUT_S = 120.0


class StreamError(Exception):
    """A fatal problem found by a loader worker: sent to the training process as one line."""


def shard_error_text(error: Exception) -> str:
    return str(error).split(" @ ")[0]  # webdataset appends the stream's repr after " @ "


def mixed_hash(*values: int) -> int:
    """A 64-bit hash of non-negative integers, equal in every process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(struct.pack(f"<{len(values)}Q", *values), digest_size=8).digest(), "little")


# ------------------------------------------------------------------------------------------------------ listing


def is_local(url: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*:", url) is None or url.startswith("file:")


def read_manifest(key: str, manifest: Path) -> dict:
    """A manifest written by ibq-data pack, checked for the entries the readers use."""
    try:
        content = json.loads(manifest.read_text())
        if not isinstance(content["samples"], int) or not all("name" in entry for entry in content["shards"]):
            raise ValueError("no sample count or a shard without a name")
        return content
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{key}: {manifest} is not a shard manifest written by ibq-data pack ({error})") from None


def manifest_shards(key: str, manifest: Path) -> list[str]:
    return [str(manifest.parent / entry["name"]) for entry in read_manifest(key, manifest)["shards"]]


def list_shards(key: str, spec: str | list[str]) -> list[str]:
    """The shard URLs that `spec` names: brace patterns (data/shard-{000000..000099}.tar), URLs, lists of
    them, or a folder (its manifest.json, else its *.tar files)."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for pattern in patterns:
        path = Path(str(pattern).removeprefix("file:")).expanduser()
        if is_local(str(pattern)) and path.is_dir():
            urls += manifest_shards(key, path / MANIFEST) if (path / MANIFEST).is_file() else sorted(map(str, path.glob("*.tar")))
        elif path.name == MANIFEST and path.is_file():
            urls += manifest_shards(key, path)
        else:
            from webdataset.shardlists import expand_urls

            urls += [str(Path(url).expanduser()) if is_local(url) else url for url in expand_urls(str(pattern))]
    missing = [url for url in urls if is_local(url) and not Path(url.removeprefix("file:")).is_file()]
    if not urls or len(missing) == len(urls):
        example = f" ({missing[0]} does not exist)" if missing else ""
        raise UserError(
            f"{key}={spec!r} matches no shard{example}: give a folder written by ibq-data pack, a brace pattern "
            f"such as /data/laion/{{000000..000999}}.tar, a URL, or a list of them"
        )
    if missing:
        raise UserError(f"{key}={spec!r}: {len(missing)} of its {len(urls)} shards do not exist (first: {missing[0]})")
    return urls


# ------------------------------------------------------------------------------------------------------ reading


class EndCheckingReader:
    """Passes a tar stream through and tells whether it ended as a complete archive does: a multiple of
    512 bytes ending in two zero blocks. Python's tarfile takes a file cut off at a header for a shorter
    archive; this catches it."""

    END = bytes(1024)

    def __init__(self, stream):
        self.stream, self.size, self.tail = stream, 0, b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.size += len(data)
        self.tail = (self.tail + data)[-len(self.END):]
        return data

    def check_complete(self) -> None:
        while self.read(1 << 20):
            pass
        if self.size % 512 or self.tail != self.END:
            raise tarfile.ReadError(f"truncated: {self.size} bytes and no end-of-archive blocks")


class TimedPipe:
    """A command's output (webdataset's Pipe) read straight from its file descriptor, each read waiting at
    most `timeout_s` for data: a stalled download or command is killed and its shard fails with an
    OSError, which the readers count as unreadable, instead of blocking the loader for ever."""

    def __init__(self, pipe, timeout_s: float):
        self.pipe, self.timeout_s, self.fd = pipe, timeout_s, pipe.stream.fileno()

    def read(self, size: int = -1) -> bytes:
        blocks, wanted = [], size if size >= 0 else float("inf")
        while wanted > 0:
            if not select.select([self.fd], [], [], self.timeout_s)[0]:
                self.pipe.ignore_errors = True  # killed here: its exit status says nothing more
                self.pipe.proc.kill()
                raise TimeoutError(f"no data for {self.timeout_s:g} s (data.read_timeout_s)")
            block = os.read(self.fd, int(min(wanted, 1 << 20)))
            if not block:
                break
            blocks.append(block)
            wanted -= len(block)
        return b"".join(blocks)

    def close(self) -> None:
        self.pipe.close()  # waits for the command; a failed one raises with its exit status


def read_shard(url: str, timeout_s: float = READ_TIMEOUT_S) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard, in file order: {"__key__", "__url__", extension: bytes, ...}."""
    from webdataset import gopen
    from webdataset.gopen import Pipe
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    stream = gopen(url)
    if isinstance(stream, Pipe):
        stream = TimedPipe(stream, timeout_s)
    try:
        reader = EndCheckingReader(stream)
        samples = group_by_keys({**member, "__url__": url} for member in tar_file_iterator(reader))
        # the last sample waits for the end check: a cut-off shard may have cut it short too
        previous = None
        for sample in samples:
            if previous is not None:
                yield previous
            previous = sample
        reader.check_complete()
        if previous is not None:
            yield previous
    finally:
        stream.close()


def interleaved(urls: list[str], rng: random.Random, buffer_size: int, on_corrupt, timeout_s: float) -> Iterator[dict[str, Any]]:
    """The samples of a group of shards: drawn from the open shards at random, through a shuffle buffer.
    A shard that fails to read is closed and reported; the samples it gave before stay in the stream."""
    readers = [(url, read_shard(url, timeout_s)) for url in urls]
    buffer: list[dict[str, Any]] = []
    while readers:
        index = rng.randrange(len(readers))
        url, reader = readers[index]
        try:
            buffer.append(next(reader))
        except StopIteration:
            readers.pop(index)
            continue
        except SHARD_ERRORS as error:
            readers.pop(index)
            on_corrupt(url, error)
            continue
        if len(buffer) >= buffer_size:
            pick = rng.randrange(len(buffer))
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


@dataclass(frozen=True)
class ShardSource:
    name: str
    urls: tuple[str, ...]
    weight: float


@dataclass(frozen=True)
class StreamSettings:
    seed: int
    resolution: int
    crop: str
    shuffle_shards: int
    shuffle_buffer: int
    max_corrupt_share: float
    read_timeout_s: float = READ_TIMEOUT_S


def start_cursor() -> dict[str, int]:
    # corrupt: shards of this epoch found unreadable before the current group
    return {"epoch": 0, "group": 0, "offset": 0, "corrupt": 0}


class SourceSlot:
    """One source's raw samples for one slot, epoch after epoch, each with the cursor just after it."""

    def __init__(self, source: ShardSource, index: int, slot: int, slots: int, settings: StreamSettings, cursor: dict | None):
        self.source, self.index, self.slot, self.slots, self.settings = source, index, slot, slots, settings
        self.cursor = dict(cursor or start_cursor())
        self.unreadable = 0  # shards found unreadable by this reader

    def epoch_shards(self, epoch: int) -> list[str]:
        order = list(self.source.urls)
        random.Random(mixed_hash(self.settings.seed, self.index, epoch)).shuffle(order)
        return order[self.slot :: self.slots]

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[str, int]]]:
        cursor, settings = self.cursor, self.settings
        while True:
            shards = self.epoch_shards(cursor["epoch"])
            groups = [shards[i : i + settings.shuffle_shards] for i in range(0, len(shards), settings.shuffle_shards)]
            read_any = False
            while cursor["group"] < len(groups):
                corrupt_in_group = 0

                def on_corrupt(url: str, error: Exception) -> None:
                    nonlocal corrupt_in_group
                    corrupt_in_group += 1
                    self.unreadable += 1
                    corrupt = cursor["corrupt"] + corrupt_in_group
                    log.warning("skipped the rest of unreadable shard %s (%s): %d of this worker's %d shards this epoch",
                                url, shard_error_text(error), corrupt, len(shards))
                    if corrupt > settings.max_corrupt_share * len(shards):
                        raise StreamError(
                            f"data.sources.{self.source.name}: {corrupt} of a loader worker's {len(shards)} shards are unreadable "
                            f"(last: {url}: {shard_error_text(error)}), more than data.max_corrupt_share="
                            f"{settings.max_corrupt_share}: repair or remove them, or raise data.max_corrupt_share"
                        )

                rng = random.Random(mixed_hash(settings.seed, self.index, cursor["epoch"], self.slot, cursor["group"]))
                taken = 0
                for sample in interleaved(groups[cursor["group"]], rng, settings.shuffle_buffer, on_corrupt, settings.read_timeout_s):
                    taken += 1
                    read_any = True
                    if taken <= cursor["offset"]:  # replaying the group up to the resumed position
                        continue
                    cursor["offset"] = taken
                    yield sample, dict(cursor)
                cursor.update(group=cursor["group"] + 1, offset=0, corrupt=cursor["corrupt"] + corrupt_in_group)
            if not read_any:  # an epoch that gives this slot nothing would loop forever
                raise StreamError(
                    f"data.sources.{self.source.name}: the {len(shards)} shard(s) a loader worker read in epoch "
                    f"{cursor['epoch']} hold no sample (first: {shards[0]})"
                )
            cursor.update(start_cursor(), epoch=cursor["epoch"] + 1)


class MixSlot:
    """One slot's samples of a mix: each sample's source drawn with the weights, as a function of
    (seed, slot, samples drawn so far), so a resumed slot draws what an uninterrupted one would."""

    def __init__(self, sources: list[ShardSource], slot: int, slots: int, settings: StreamSettings, cursor: dict | None):
        cursor = cursor or {"drawn": 0, "sources": [None] * len(sources)}
        self.slot, self.seed, self.drawn = slot, settings.seed, cursor["drawn"]
        self.readers = [SourceSlot(source, index, slot, slots, settings, saved)
                        for index, (source, saved) in enumerate(zip(sources, cursor["sources"]))]
        self.slots = [iter(reader) for reader in self.readers]
        self.cursors = list(cursor["sources"])
        total = sum(source.weight for source in sources)
        self.bounds = [sum(source.weight for source in sources[: i + 1]) / total for i in range(len(sources))]

    def __iter__(self) -> Iterator[tuple[dict[str, Any], int, dict]]:
        """(raw sample, its source's index, the slot's cursor just after it)"""
        while True:
            draw = mixed_hash(self.seed, self.slot, self.drawn) / 2**64
            index = min(bisect.bisect_right(self.bounds, draw), len(self.bounds) - 1)
            sample, self.cursors[index] = next(self.slots[index])
            self.drawn += 1
            yield sample, index, {"drawn": self.drawn, "sources": list(self.cursors)}

    def unreadable(self) -> int:
        return sum(reader.unreadable for reader in self.readers)


def image_of(sample: dict[str, Any]) -> bytes:
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return sample[extension]
    held = ", ".join(f".{key}" for key in sample if not key.startswith("__")) or "nothing"
    raise StreamError(
        f"sample {sample_name(sample)} has no image (it holds {held}); "
        f"a sample needs one of {', '.join('.' + e for e in IMAGE_EXTENSIONS)}"
    )


def sample_name(sample: dict[str, Any]) -> str:
    return f"{sample['__key__']!r} of shard {sample['__url__']}"


def decode(sample: dict[str, Any], settings: StreamSettings, epoch: int) -> tuple[Tensor, int, str] | None:
    """The seed's preprocessing: shorter side to the resolution, then a random (seeded by the sample's
    key and the epoch) or centre crop; pixels in [-1, 1]. None when the image does not decode."""
    image = load_resized(io.BytesIO(image_of(sample)), settings.resolution, sample_name(sample))
    if image is None:
        return None
    if settings.crop == "random":
        key = zlib.crc32(f"{sample['__url__']}/{sample['__key__']}".encode())
        image = random_crop(image, settings.resolution, position_generator(settings.seed, mixed_hash(key, epoch)))
    else:
        image = TF.center_crop(image, settings.resolution)
    label = int(sample["cls"]) if "cls" in sample else -1
    caption = sample["txt"].decode("utf-8", "replace") if "txt" in sample else ""
    return image.contiguous(), label, caption


class ShardBatches(IterableDataset):
    """Micro-batches of one rank's slots; in loader worker w the slot is rank * workers + (w + rotation)
    % workers. `rotation` continues the loader's round robin over its workers after a resume."""

    def __init__(self, sources, settings, micro_batch, rank, workers, slots, rotation, cursors):
        self.sources, self.settings, self.micro_batch = sources, settings, micro_batch
        self.rank, self.workers, self.slots, self.rotation, self.cursors = rank, workers, slots, rotation, cursors

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot = self.rank * self.workers + (worker + self.rotation) % self.workers
        images, labels, keys, captions, skipped, unreadable = [], [], [], [], 0, 0
        try:
            mix = MixSlot(self.sources, slot, self.slots, self.settings, self.cursors.get(slot))
            for sample, source, cursor in mix:
                decoded = decode(sample, self.settings, cursor["sources"][source]["epoch"])
                if decoded is None:  # load_resized said which
                    skipped += 1
                    continue
                images.append(decoded[0]), labels.append(decoded[1]), captions.append(decoded[2])
                keys.append(f"{sample['__url__']}#{sample['__key__']}")
                if len(images) == self.micro_batch:
                    yield {"images": torch.stack(images), "labels": torch.tensor(labels), "keys": keys,
                           "captions": captions, "slot": slot, "cursor": cursor,
                           "skipped_samples": skipped, "unreadable_shards": mix.unreadable() - unreadable}
                    images, labels, keys, captions, skipped, unreadable = [], [], [], [], 0, mix.unreadable()
        except StreamError as error:
            yield {"error": str(error)}


class ShardStream:
    """The training set of a shard config: it has no length and no positions; a job reads it through
    `batches`, whose `state()` is the stream's place in the checkpoint."""

    def __init__(self, sources: list[ShardSource], settings: StreamSettings, num_workers: int):
        self.sources, self.settings, self.num_workers = sources, settings, num_workers

    def workers_for(self, world_size: int) -> int:
        """Loader workers per rank such that every slot has a shard of every source of its own."""
        fewest = min(self.sources, key=lambda source: len(source.urls))
        if len(fewest.urls) < world_size:
            raise UserError(
                f"data.sources.{fewest.name} has {len(fewest.urls)} shard(s), fewer than the {world_size} ranks: "
                f"each rank needs shards of its own (ibq-data pack --samples-per-shard N makes more, smaller ones)"
            )
        workers = max(self.num_workers, 1)
        if len(fewest.urls) < world_size * workers:
            fitting = len(fewest.urls) // world_size
            log.warning("data.sources.%s has %d shard(s), fewer than %d rank(s) x %d loader workers: using %d worker(s) "
                        "per rank so that no two read the same shard", fewest.name, len(fewest.urls), world_size, workers, fitting)
            workers = fitting
        return workers if self.num_workers else 0

    def batches(self, micro_batch: int, rank: int, world_size: int, state: dict | None) -> StreamBatches:
        return StreamBatches(self, micro_batch, rank, world_size, state)


class StreamBatches:
    """This rank's micro-batches of a ShardStream. Each batch comes from one loader worker with the
    cursor of its slot after it; the cursors of the batches taken so far make the state."""

    def __init__(self, stream: ShardStream, micro_batch: int, rank: int, world_size: int, state: dict | None):
        workers = stream.workers_for(world_size)
        slots_per_rank = max(workers, 1)
        slots = world_size * slots_per_rank
        state = state or {"slots": slots, "taken": 0, "cursors": {}}
        if state["slots"] != slots:
            raise UserError(
                f"the checkpoint's data stream was read by {state['slots']} loader slots (ranks x workers), this job "
                f"reads it with {slots} ({world_size} rank(s) x {slots_per_rank}): resume with the same ranks and data.num_workers"
            )
        own = range(rank * slots_per_rank, (rank + 1) * slots_per_rank)
        self.slots, self.taken = slots, state["taken"]
        self.problems = {"data/skipped_samples": 0, "data/unreadable_shards": 0}  # since this job started
        self.cursors = {slot: cursor for slot, cursor in state["cursors"].items() if slot in own}
        dataset = ShardBatches(stream.sources, stream.settings, micro_batch, rank, slots_per_rank, slots,
                               self.taken % slots_per_rank, dict(self.cursors))
        self.loader = iter(DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        batch = self.next_batch()
        return batch["images"], batch["labels"]

    def next_batch(self) -> dict:
        batch = next(self.loader)
        if "error" in batch:
            raise UserError(batch["error"])
        self.cursors[batch["slot"]] = batch["cursor"]
        self.taken += 1
        self.problems["data/skipped_samples"] += batch["skipped_samples"]
        self.problems["data/unreadable_shards"] += batch["unreadable_shards"]
        return batch

    def state(self) -> dict:
        return {"slots": self.slots, "taken": self.taken, "cursors": dict(self.cursors)}

    def counters(self) -> dict[str, int]:
        """Samples skipped as undecodable and shards found unreadable by this rank since the job started."""
        return dict(self.problems)


def merge_states(states: list[dict]) -> dict:
    """One checkpoint entry from every rank's state (each holds its own slots' cursors)."""
    merged = {**states[0], "cursors": {}}
    for state in states:
        merged["cursors"].update(state["cursors"])
    return merged


# ------------------------------------------------------------------------------------------------------ validation


class ShardImages(Dataset):
    """The first `limit` samples of a shard set in file order, centre-cropped: a fixed evaluation set.
    The encoded images are held in memory and decoded when read."""

    def __init__(self, key: str, urls: list[str], limit: int, resolution: int):
        self.resolution, self.samples = resolution, []
        for url in urls:
            try:
                for sample in read_shard(url):
                    image_of(sample)
                    self.samples.append(sample)
                    if len(self.samples) == limit:
                        return
            except SHARD_ERRORS as error:
                log.warning("skipped the rest of unreadable shard %s (%s)", url, shard_error_text(error))
            except StreamError as error:
                raise UserError(f"{key}: {error}") from None
        if not self.samples:
            raise UserError(f"{key}: its shards ({urls[0]} ...) hold no readable sample")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        sample = self.samples[index]
        image = load_resized(io.BytesIO(image_of(sample)), self.resolution, sample_name(sample))
        if image is None:  # keep the set fixed: a failing image is black, and logged
            image = torch.full((3, self.resolution, self.resolution), -1.0)
        return TF.center_crop(image, self.resolution).contiguous(), int(sample["cls"]) if "cls" in sample else -1


def build_shard_val(urls: str | list[str], resolution: int, seed: int, limit: int = 256, num_workers: int = 0) -> DataSplits:
    check_positive_int("data.val.limit", limit)
    return DataSplits(None, ShardImages("data.val.urls", list_shards("data.val.urls", urls), limit, resolution), num_workers)


# ------------------------------------------------------------------------------------------------------ builder


def check_stream_settings(crop: str, shuffle_shards: int, shuffle_buffer: int, max_corrupt_share: float, read_timeout_s: float) -> None:
    if crop not in CROPS:
        raise UserError(f"data.crop={crop!r} is invalid; valid: {', '.join(CROPS)}")
    check_positive_int("data.shuffle_shards", shuffle_shards)
    check_positive_int("data.shuffle_buffer", shuffle_buffer)
    if not isinstance(max_corrupt_share, (int, float)) or not 0 <= max_corrupt_share < 1:
        raise UserError(f"data.max_corrupt_share={max_corrupt_share!r} is invalid: a share in [0, 1)")
    if isinstance(read_timeout_s, bool) or not isinstance(read_timeout_s, (int, float)) or not 0 < read_timeout_s < float("inf"):
        raise UserError(f"data.read_timeout_s={read_timeout_s!r} is invalid: seconds > 0")


def manifest_samples(name: str, spec) -> int:
    """weight: samples -- the sample count in the manifest of the source's folder."""
    manifest = Path(str(spec)).expanduser() / MANIFEST
    if not isinstance(spec, str) or not manifest.is_file():
        raise UserError(f"data.sources.{name}.weight=samples needs a folder written by ibq-data pack (its manifest counts "
                        f"the samples), and {spec} has no {MANIFEST}: give the weight as a number")
    return int(read_manifest(f"data.sources.{name}.urls", manifest)["samples"])


def shard_sources(sources: dict) -> list[ShardSource]:
    """The sources with a positive weight; negative or all-zero weights are refused."""
    if not sources:
        raise UserError("data.sources is empty: give at least one source with urls and weight")
    chosen = []
    for name, source in sources.items():
        weight = source.get("weight", 1.0)
        if weight == "samples":
            weight = manifest_samples(name, source["urls"])
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise UserError(f"data.sources.{name}.weight={weight!r} is invalid: a sampling weight must be a number >= 0 "
                            f"or 'samples'")
        if weight > 0:
            chosen.append(ShardSource(str(name), tuple(list_shards(f"data.sources.{name}.urls", source["urls"])), float(weight)))
    if not chosen:
        raise UserError(f"data.sources: every weight is 0 ({', '.join(map(str, sources))}): give at least one source a weight > 0")
    return chosen


def build_shards(
    sources: DictConfig | dict,
    val: DictConfig | dict,
    resolution: int,
    seed: int,
    root: str | None = None,
    crop: str = "random",
    shuffle_shards: int = 4,
    shuffle_buffer: int = 1000,
    max_corrupt_share: float = 0.05,
    read_timeout_s: float = READ_TIMEOUT_S,
    num_workers: int = 4,
) -> DataSplits:
    """A ShardStream for training and, from the `val` data config, the validation set. `root` is only
    read by the sources' urls (${data.root}/<source>)."""
    check_stream_settings(crop, shuffle_shards, shuffle_buffer, max_corrupt_share, read_timeout_s)
    if isinstance(sources, DictConfig):
        sources = OmegaConf.to_container(sources, resolve=True)
    settings = StreamSettings(seed, resolution, crop, shuffle_shards, shuffle_buffer, float(max_corrupt_share), float(read_timeout_s))
    stream = ShardStream(shard_sources(sources), settings, num_workers)
    val_config = OmegaConf.create(OmegaConf.to_container(val, resolve=True) if isinstance(val, DictConfig) else val)
    for key in sorted(OmegaConf.missing_keys(val_config) - {"resolution"}):
        raise unset_key(f"data.val.{key}")
    return DataSplits(stream, build(val_config, resolution=resolution, seed=seed).val, num_workers)
