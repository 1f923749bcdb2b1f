"""Datasets: training items are addressed by global sample position (see positions.py)."""

from ibq.data.splits import DataSplits
from ibq.data.image_folder import build_image_folder
from ibq.data.photos import build_photos
from ibq.data.positions import PositionSampler

__all__ = ["DataSplits", "PositionSampler", "build_image_folder", "build_photos"]
