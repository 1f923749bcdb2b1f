"""Datasets: training items addressed by global sample position (see positions.py), or streamed from
tar shards with their position in the checkpoint (see shards/)."""

from ibq.data.splits import DataSplits
from ibq.data.image_folder import build_image_folder
from ibq.data.photos import build_photos
from ibq.data.positions import PositionSampler
from ibq.data.shards import build_shard_val, build_shards

__all__ = ["DataSplits", "PositionSampler", "build_image_folder", "build_photos", "build_shard_val", "build_shards"]
