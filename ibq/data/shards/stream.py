"""The training stream of a shard config: micro-batches of decoded images from every loader slot of a rank,
with the slots' cursors as the stream's place in the checkpoint."""

from __future__ import annotations

import io
import logging
import zlib
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import functional as TF

from ibq.config import build
from ibq.data.image_folder import load_resized
from ibq.data.positions import position_generator, random_crop
from ibq.data.shards.cursors import ShardSource, StreamSettings, mixed_hash
from ibq.data.shards.mixing import MixSlot, shard_sources
from ibq.data.shards.reading import READ_TIMEOUT_S, StreamError, image_of, sample_name
from ibq.data.splits import DataSplits
from ibq.errors import UserError, check_positive_int, unset_key

log = logging.getLogger(__name__)

CROPS = ("random", "center")


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

    def batches(self, micro_batch: int, rank: int, world_size: int, state: dict | None, pin_memory: bool = False) -> StreamBatches:
        return StreamBatches(self, micro_batch, rank, world_size, state, pin_memory)


class StreamBatches:
    """This rank's micro-batches of a ShardStream. Each batch comes from one loader worker with the
    cursor of its slot after it; the cursors of the batches taken so far make the state."""

    def __init__(self, stream: ShardStream, micro_batch: int, rank: int, world_size: int, state: dict | None,
                 pin_memory: bool = False):
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
        self.loader = iter(DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False, pin_memory=pin_memory))

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


def check_stream_settings(crop: str, shuffle_shards: int, shuffle_buffer: int, max_corrupt_share: float, read_timeout_s: float) -> None:
    if crop not in CROPS:
        raise UserError(f"data.crop={crop!r} is invalid; valid: {', '.join(CROPS)}")
    check_positive_int("data.shuffle_shards", shuffle_shards)
    check_positive_int("data.shuffle_buffer", shuffle_buffer)
    if not isinstance(max_corrupt_share, (int, float)) or not 0 <= max_corrupt_share < 1:
        raise UserError(f"data.max_corrupt_share={max_corrupt_share!r} is invalid: a share in [0, 1)")
    if isinstance(read_timeout_s, bool) or not isinstance(read_timeout_s, (int, float)) or not 0 < read_timeout_s < float("inf"):
        raise UserError(f"data.read_timeout_s={read_timeout_s!r} is invalid: seconds > 0")


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
