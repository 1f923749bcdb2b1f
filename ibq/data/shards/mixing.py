"""A weighted mix of shard sources: each sample's source drawn at random with the configured weights (a
fixed function of seed, slot and sample count); each source streams on its own and starts its next epoch
when its shards of the current one are read."""

from __future__ import annotations

import bisect
from typing import Any, Iterator

from ibq.data.shards.cursors import ShardSource, SourceSlot, StreamSettings, mixed_hash
from ibq.data.shards.listing import list_shards, manifest_samples
from ibq.errors import UserError


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
