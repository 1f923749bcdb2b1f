"""SimVQ (Zhu et al. 2024): a frozen Gaussian codebook C times a learned linear map W.

The effective codebook is E = C W^T (+ b); every step moves all codes together through W, which is
SimVQ's answer to codebook collapse. C ~ N(0, 1/dim) is a buffer (never trained); W is a Linear with
bias as in the official code. Nearest code by squared L2 to E, losses ||q - sg(z)||^2 (trains W) +
beta ||sg(q) - z||^2, straight-through to the encoder. Decoding goes through the projected codebook,
not through C (the official `get_codebook_entry` returns C, a known pitfall).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibq.errors import check_positive_int
from ibq.quantizers.base import Quantizer, QuantizerOutput, batch_usage_stats, to_tokens
from ibq.quantizers.chunked import nearest_code


class SimVQ(Quantizer):
    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, map_bias: bool = True):
        super().__init__()
        self.codebook_size = check_positive_int("quantizer.codebook_size", codebook_size)
        self.dim = check_positive_int("quantizer.dim", dim)
        self.beta = beta
        self.register_buffer("frozen_codebook", torch.randn(codebook_size, dim) * dim**-0.5)
        self.codebook_map = nn.Linear(dim, dim, bias=map_bias)


    def _quantize(self, z: Tensor) -> QuantizerOutput:
        tokens = to_tokens(z)
        with torch.no_grad():
            indices = nearest_code(tokens, self.codebook_map(self.frozen_codebook))
        # Mapping only the selected rows gives W the same gradient as E[indices], without a K x D graph.
        quantized = self.codebook_map(self.frozen_codebook[indices])
        codebook_term = F.mse_loss(quantized, tokens.detach())
        commitment = F.mse_loss(quantized.detach(), tokens)
        stats = {
            "loss/codebook": codebook_term.detach(),
            "loss/commitment": commitment.detach(),
            **batch_usage_stats(indices, self.codebook_size),
        }
        return QuantizerOutput.from_tokens(
            tokens + (quantized - tokens).detach(), indices, codebook_term + self.beta * commitment, stats, z.shape
        )

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.codebook_map(self.frozen_codebook[indices]).permute(0, 3, 1, 2)
