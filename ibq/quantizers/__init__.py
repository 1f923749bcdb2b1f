"""Quantizers, one file each, all returning `QuantizerOutput` (see base.py)."""

from ibq.quantizers.base import QuantizerOutput
from ibq.quantizers.ibq import IBQ
from ibq.quantizers.vq import VQ

__all__ = ["IBQ", "VQ", "QuantizerOutput"]
