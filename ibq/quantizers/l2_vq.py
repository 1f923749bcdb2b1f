"""LlamaGen-style vector quantization (Sun et al. 2024): l2-normalised features and codes, optionally
looked up in a low-dimensional space.

Features z and codes e are l2-normalised before the lookup, so the nearest code by squared L2 is the
one of highest cosine similarity, and the decoder always receives unit-norm codes. With
`codebook_dim` < dim, a linear projection maps dim -> codebook_dim before the lookup and back after it
(LlamaGen's recipe is 8-dim codes, done there by its quant_conv). Losses as LlamaGen (not legacy):
||q - sg(z)||^2 + beta ||sg(q) - z||^2 on the normalised vectors, straight-through to the encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibq.errors import check_positive_int
from ibq.quantizers.base import Quantizer, QuantizerOutput, batch_usage_stats, to_tokens
from ibq.quantizers.chunked import nearest_code


class L2VQ(Quantizer):
    def __init__(self, codebook_size: int, dim: int, codebook_dim: int | None = 8, beta: float = 0.25):
        super().__init__()
        self.codebook_size = check_positive_int("quantizer.codebook_size", codebook_size)
        self.dim = check_positive_int("quantizer.dim", dim)
        self.codebook_dim = dim if codebook_dim is None else check_positive_int("quantizer.codebook_dim", codebook_dim)
        self.beta = beta
        needs_projection = self.codebook_dim != dim
        self.project_in = nn.Linear(dim, self.codebook_dim) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, dim) if needs_projection else nn.Identity()
        self.codebook = nn.Embedding(codebook_size, self.codebook_dim)


    def _quantize(self, z: Tensor) -> QuantizerOutput:
        latents = F.normalize(self.project_in(to_tokens(z)), dim=-1)
        with torch.no_grad():
            indices = nearest_code(latents, F.normalize(self.codebook.weight, dim=-1))
        quantized = F.normalize(self.codebook(indices), dim=-1)  # autograd through the N selected rows only
        codebook_term = F.mse_loss(quantized, latents.detach())
        commitment = F.mse_loss(quantized.detach(), latents)
        stats = {
            "loss/codebook": codebook_term.detach(),
            "loss/commitment": commitment.detach(),
            **batch_usage_stats(indices, self.codebook_size),
        }
        return QuantizerOutput.from_tokens(
            self.project_out(latents + (quantized - latents).detach()), indices, codebook_term + self.beta * commitment, stats, z.shape
        )

    def decode_indices(self, indices: Tensor) -> Tensor:
        codes = F.normalize(self.codebook(indices), dim=-1)
        return self.project_out(codes).permute(0, 3, 1, 2)
