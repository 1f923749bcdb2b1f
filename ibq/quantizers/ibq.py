"""Index Backpropagation Quantization (Shi et al., arXiv 2412.02692).

The index is the argmax of raw dot-product logits; the decoder receives a straight-through one-hot
over the categorical distribution (one_hot - sg(p) + p) times the codebook, so the reconstruction
gradient reaches every code through the softmax, not only the selected one. Defaults follow the
released code: beta=0.25 sits on the codebook term; the paper's Eq. 10 puts it on the commitment
term instead (commitment_weight=0.25, codebook_weight=1.0).

`chunk_size=None` computes the tokens x K logits at once; an integer computes the same values and
gradients holding at most tokens x chunk_size logits (ibq.quantizers.chunked), for K up to 2^20, with
`chunk_kernels` "torch" (GEMMs per block of tokens) or "triton" (fused kernels on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibq.errors import UserError, check_positive_int
from ibq.quantizers.base import Quantizer, QuantizerOutput, batch_usage_stats, selected_codes, to_tokens
from ibq.quantizers.chunked import ENTROPY_EPS, KERNELS, chunked_ibq


def entropy_terms(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """MAGVIT-v2 entropy statistics of softmax(logits / T) over the batch's tokens.

    Returns (mean per-token entropy, entropy of the batch-average distribution)."""
    log_probs = F.log_softmax(logits / temperature, dim=-1)
    probs = log_probs.exp()
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    avg_probs = probs.mean(0)
    codebook_entropy = -(avg_probs * torch.log(avg_probs + ENTROPY_EPS)).sum()
    return sample_entropy, codebook_entropy


class IBQ(Quantizer):
    def __init__(
        self,
        codebook_size: int,
        dim: int,
        double_quant_weight: float = 1.0,
        commitment_weight: float = 1.0,
        codebook_weight: float = 0.25,
        entropy_weight: float = 0.05,
        entropy_temperature: float = 0.01,
        sample_entropy_weight: float = 1.0,
        codebook_entropy_weight: float = 1.0,
        chunk_size: int | None = None,
        chunk_kernels: str = "torch",
    ):
        super().__init__()
        self.codebook_size = check_positive_int("quantizer.codebook_size", codebook_size)
        self.dim = check_positive_int("quantizer.dim", dim)
        if entropy_temperature <= 0:
            raise UserError(f"quantizer.entropy_temperature={entropy_temperature} is invalid: it must be > 0")
        if chunk_size is not None:
            check_positive_int("quantizer.chunk_size", chunk_size)
        if chunk_kernels not in KERNELS:
            raise UserError(f"quantizer.chunk_kernels={chunk_kernels!r} is invalid; valid: {', '.join(KERNELS)}")
        self.double_quant_weight = double_quant_weight
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.sample_entropy_weight = sample_entropy_weight
        self.codebook_entropy_weight = codebook_entropy_weight
        self.chunk_size = chunk_size
        self.chunk_kernels = chunk_kernels
        # N(0, 1), as nn.Embedding's default: the released IBQ uses no other initialisation.
        self.codebook = nn.Embedding(codebook_size, dim)


    def _dense(self, tokens: Tensor):
        codebook = self.codebook.weight
        logits = tokens @ codebook.t()
        probs = logits.softmax(-1)
        indices = logits.argmax(-1)
        one_hot = F.one_hot(indices, self.codebook_size).to(probs.dtype)
        soft_one_hot = one_hot - probs.detach() + probs
        z_q = soft_one_hot @ codebook  # equals codebook[indices] in value
        z_hard = selected_codes(codebook, indices)
        sample_entropy, codebook_entropy = entropy_terms(logits, self.entropy_temperature)
        return z_q, z_hard, indices, sample_entropy, codebook_entropy

    def _quantize(self, z: Tensor) -> QuantizerOutput:
        tokens = to_tokens(z)
        if self.chunk_size is None:
            z_q, z_hard, indices, sample_entropy, codebook_entropy = self._dense(tokens)
        else:
            z_q, z_hard, indices, sample_entropy, codebook_entropy = chunked_ibq(
                tokens, self.codebook.weight, self.entropy_temperature, self.chunk_size, self.chunk_kernels
            )

        double_quant = F.mse_loss(z_q, tokens)
        commitment = F.mse_loss(z_hard.detach(), tokens)
        codebook_term = F.mse_loss(z_hard, tokens.detach())
        entropy = self.sample_entropy_weight * sample_entropy - self.codebook_entropy_weight * codebook_entropy
        loss = (
            self.double_quant_weight * double_quant
            + self.commitment_weight * commitment
            + self.codebook_weight * codebook_term
            + self.entropy_weight * entropy
        )
        stats = {
            "loss/double_quant": double_quant.detach(),
            "loss/commitment": commitment.detach(),
            "loss/codebook": codebook_term.detach(),
            "loss/entropy": entropy.detach(),
            "entropy/sample": sample_entropy.detach(),
            "entropy/codebook": codebook_entropy.detach(),
            **batch_usage_stats(indices, self.codebook_size),
        }
        return QuantizerOutput.from_tokens(z_q, indices, loss, stats, z.shape)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """(B, H, W) int64 -> z_q (B, D, H, W)."""
        return self.codebook(indices).permute(0, 3, 1, 2)
