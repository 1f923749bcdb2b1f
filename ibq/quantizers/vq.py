"""Textbook vector quantization (van den Oord et al. 2017) with a straight-through estimator.

Nearest code by squared L2. `legacy=True` reproduces taming-transformers' VectorQuantizer2 default
(beta on the codebook term, weight 1 on the commitment term), which SEED-Voken's VQ baseline uses."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ibq.errors import check_positive_int
from ibq.quantizers.base import Quantizer, QuantizerOutput, batch_usage_stats, selected_codes, to_tokens


class VQ(Quantizer):
    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, legacy: bool = False):
        super().__init__()
        self.codebook_size = check_positive_int("quantizer.codebook_size", codebook_size)
        self.dim = check_positive_int("quantizer.dim", dim)
        self.beta = beta
        self.legacy = legacy
        self.codebook = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)


    def _quantize(self, z: Tensor) -> QuantizerOutput:
        tokens = to_tokens(z)
        codebook = self.codebook.weight
        distances = (
            tokens.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * tokens @ codebook.t()
        )
        indices = distances.argmin(-1)
        z_hard = selected_codes(codebook, indices)
        codebook_term = F.mse_loss(z_hard, tokens.detach())
        commitment = F.mse_loss(z_hard.detach(), tokens)
        if self.legacy:
            loss = self.beta * codebook_term + commitment
        else:
            loss = codebook_term + self.beta * commitment
        z_q = tokens + (z_hard - tokens).detach()
        stats = {
            "loss/codebook": codebook_term.detach(),
            "loss/commitment": commitment.detach(),
            **batch_usage_stats(indices, self.codebook_size),
        }
        return QuantizerOutput.from_tokens(z_q, indices, loss, stats, z.shape)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.codebook(indices).permute(0, 3, 1, 2)
