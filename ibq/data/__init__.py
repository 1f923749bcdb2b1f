"""Datasets: training items addressed by global sample position (see positions.py), or streamed from
tar shards with their position in the checkpoint (see shards/).

The builders are loaded on first use (`ibq.data.build_photos`, as a config's `_target_` names them): a
module that needs only `ibq.data.splits` or `positions` does not load torchvision with them."""

from importlib import import_module

_EXPORTS = {
    "DataSplits": "ibq.data.splits",
    "PositionSampler": "ibq.data.positions",
    "build_image_folder": "ibq.data.image_folder",
    "build_photos": "ibq.data.photos",
    "build_shard_val": "ibq.data.shards",
    "build_shards": "ibq.data.shards",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ibq.data' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
