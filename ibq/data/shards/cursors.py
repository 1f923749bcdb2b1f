"""One source's samples for one loader slot, with the cursor that resumes them.

Each epoch, a source's shards are shuffled (seeded by seed and epoch) and dealt to the job's slots, one
slot per (rank, loader worker): slot s reads shards s, s+S, s+2S, ... of that order, so ranks and workers
read disjoint shards and together read every shard once per epoch. A slot reads its shards
`shuffle_shards` at a time, interleaving their samples at random and passing them through a shuffle
buffer that is emptied when the group ends. The group is the unit of replay: a slot's position is
(epoch, group, samples taken from the group), and a resumed run reads that group again up to the
position, without decoding, then goes on; it neither restarts the epoch nor repeats a sample."""

from __future__ import annotations

import hashlib
import logging
import random
import struct
from dataclasses import dataclass
from typing import Any, Iterator

from ibq.data.shards.reading import READ_TIMEOUT_S, SHARD_ERRORS, StreamError, read_shard, shard_error_text

log = logging.getLogger(__name__)


def mixed_hash(*values: int) -> int:
    """A 64-bit hash of non-negative integers, equal in every process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(struct.pack(f"<{len(values)}Q", *values), digest_size=8).digest(), "little")


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
