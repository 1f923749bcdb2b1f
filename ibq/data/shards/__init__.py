"""Training samples streamed from webdataset tar shards: one source, or a weighted mix of several.

listing: which shards a config names; reading: the samples of one shard and the validation set; cursors:
one source's samples for one loader slot, resumable; mixing: the weighted draw over sources; stream: the
rank's micro-batches and the checkpointed state."""

from ibq.data.shards.cursors import ShardSource, SourceSlot, StreamSettings, mixed_hash
from ibq.data.shards.listing import MANIFEST, list_shards, read_manifest
from ibq.data.shards.mixing import MixSlot
from ibq.data.shards.reading import (
    IMAGE_EXTENSIONS,
    SHARD_ERRORS,
    StreamError,
    build_shard_val,
    image_of,
    read_shard,
    shard_error_text,
)
from ibq.data.shards.stream import ShardStream, StreamBatches, build_shards, merge_states

__all__ = [
    "IMAGE_EXTENSIONS", "MANIFEST", "SHARD_ERRORS", "MixSlot", "ShardSource", "ShardStream", "SourceSlot", "StreamBatches",
    "StreamError", "StreamSettings", "build_shard_val", "build_shards", "image_of", "list_shards", "merge_states", "mixed_hash",
    "read_manifest", "read_shard", "shard_error_text",
]
