"""Quantizers, one file each, all returning `QuantizerOutput` (see base.py)."""

from ibq.quantizers.base import QuantizerOutput
from ibq.quantizers.ema_vq import EMAVQ
from ibq.quantizers.fsq import FSQ
from ibq.quantizers.ibq import IBQ
from ibq.quantizers.l2_vq import L2VQ
from ibq.quantizers.lfq import LFQ
from ibq.quantizers.simvq import SimVQ
from ibq.quantizers.vq import VQ

__all__ = ["EMAVQ", "FSQ", "IBQ", "L2VQ", "LFQ", "SimVQ", "VQ", "QuantizerOutput"]
