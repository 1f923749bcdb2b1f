"""Lookup-free quantization (MAGVIT-v2, Yu et al. 2023): each of d = log2 K channels is quantized to
its sign, so the codebook {-1, +1}^d is implicit.

Bit order (Open-MAGVIT2's, the IBQ authors' code): channel i is bit i of the index, i.e.
index = sum_i [z_i > 0] 2^i, channel 0 the least significant bit. lucidrains' LFQ uses the reverse
order (channel 0 the most significant), so indices are not interchangeable with its checkpoints.

Entropy loss at temperature T on the logits 2 <z, c> / T, as in MAGVIT-v2: because the logits are a
sum over channels, the code distribution factorises into per-bit Bernoullis with
p(bit_i = 1 | z) = sigmoid(4 z_i / T). Both terms are exact (no per-bit or sub-group approximation):
- the per-sample entropy is the sum of the bits' binary entropies, O(N d);
- the codebook entropy H(mean_n q_n) does not factorise, so qbar is built per block of tokens from the
  per-bit log-probabilities (O(block * 2^d) memory, O(N * 2^d) time) and the backward pass rebuilds
  each block instead of storing it. No tokens x 2^d matrix is held. The only rounding beyond fp32 is
  the exp floor of code_probabilities (at most 2^d e^-50 of each token's mass).

When `dim` (the encoder's embed_dim) differs from d, a linear projection maps dim -> d before the
sign and d -> dim after it (lucidrains' project_in / project_out).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibq.errors import UserError, check_positive_int
from ibq.quantizers.base import Quantizer, QuantizerOutput, batch_usage_stats, to_tokens
from ibq.quantizers.chunked import ENTROPY_EPS, EXP_FLOOR

# Tokens per block of the codebook-entropy computation: block * 2^d stays near 2^22 floats (16 MiB).
CODE_PROBS_BUDGET = 2**22


def _code_log_probabilities(log_ones: Tensor, log_zeros: Tensor) -> Tensor:
    """(n, d) log p(bit_i = 1), log p(bit_i = 0) -> (n, 2^d) log-probabilities of every code.

    The low half of the bits and the high half are expanded separately, then joined by one broadcast
    sum, so each code's value is a sum of its bits' terms (no cancellation) in one pass over n x 2^d."""
    n, d = log_ones.shape
    if d == 1:
        return torch.cat([log_zeros, log_ones], dim=1)
    low_bits = d // 2
    low = _code_log_probabilities(log_ones[:, :low_bits], log_zeros[:, :low_bits])
    high = _code_log_probabilities(log_ones[:, low_bits:], log_zeros[:, low_bits:])
    return (high[:, :, None] + low[:, None, :]).reshape(n, -1)


def code_probabilities(bit_logits: Tensor) -> Tensor:
    """(n, d) logits of p(bit_i = 1) -> (n, 2^d) probabilities of every code, index bit i = channel i.

    The exponent is clamped at EXP_FLOOR: the probabilities of far codes would otherwise be denormals,
    ~100x slower on CPUs, and the clamp moves each distribution by at most 2^d e^-50 of its mass."""
    log_probs = _code_log_probabilities(-F.softplus(-bit_logits), -F.softplus(bit_logits))
    return log_probs.clamp_(min=EXP_FLOOR).exp_()


def code_bits(codebook_bits: int, device) -> Tensor:
    """(2^d, d) float matrix: row k holds the bits of index k."""
    index = torch.arange(2**codebook_bits, device=device)
    return ((index[:, None] >> torch.arange(codebook_bits, device=device)) & 1).float()


class _AverageCodeProbabilities(torch.autograd.Function):
    """qbar = mean_n prod_i p(bit_i | z_n) over all 2^d codes, one block of tokens at a time."""

    @staticmethod
    def forward(ctx, bit_logits: Tensor, block: int):
        n = bit_logits.shape[0]
        average = bit_logits.new_zeros(2 ** bit_logits.shape[1])
        for start in range(0, n, block):
            average += code_probabilities(bit_logits[start : start + block]).sum(0)
        ctx.save_for_backward(bit_logits)
        ctx.block = block
        return average / n

    @staticmethod
    def backward(ctx, grad_average: Tensor):
        (bit_logits,) = ctx.saved_tensors
        n, d = bit_logits.shape
        # The bits of every code and a column of ones: one GEMM gives sum_k w_nk bit_i(k) and sum_k w_nk.
        bits_and_ones = torch.cat([code_bits(d, bit_logits.device), bit_logits.new_ones(2**d, 1)], dim=1)
        grad = torch.empty_like(bit_logits)
        # d qbar_k / d u_ni = q_nk (bit_i(k) - sigmoid(u_ni)) / N
        for start in range(0, n, ctx.block):
            logits = bit_logits[start : start + ctx.block]
            sums = code_probabilities(logits).mul_(grad_average) @ bits_and_ones
            grad[start : start + ctx.block] = (sums[:, :d] - torch.sigmoid(logits) * sums[:, d:]) / n
        return grad, None


def binary_entropy(logits: Tensor) -> Tensor:
    """H(sigmoid(u)) from the logit u, stable for large |u|: p softplus(-u) + (1 - p) softplus(u)."""
    p = torch.sigmoid(logits)
    return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)


class LFQ(Quantizer):
    def __init__(
        self,
        codebook_size: int,
        dim: int,
        commitment_weight: float = 0.25,
        entropy_weight: float = 0.1,
        entropy_temperature: float = 0.01,
        sample_entropy_weight: float = 1.0,
        codebook_entropy_weight: float = 1.0,
    ):
        super().__init__()
        self.codebook_size = check_positive_int("quantizer.codebook_size", codebook_size)
        if codebook_size < 2 or codebook_size & (codebook_size - 1):
            raise UserError(
                f"quantizer.codebook_size={codebook_size} is invalid for lfq: it must be a power of two "
                f"(2^d codes from d sign bits), e.g. 256, 1024, 16384, 262144"
            )
        if entropy_temperature <= 0:
            raise UserError(f"quantizer.entropy_temperature={entropy_temperature} is invalid: it must be > 0")
        self.dim = check_positive_int("quantizer.dim", dim)
        self.codebook_bits = int(math.log2(codebook_size))
        self.commitment_weight = commitment_weight
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.sample_entropy_weight = sample_entropy_weight
        self.codebook_entropy_weight = codebook_entropy_weight
        needs_projection = dim != self.codebook_bits
        self.project_in = nn.Linear(dim, self.codebook_bits) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(self.codebook_bits, dim) if needs_projection else nn.Identity()
        self.register_buffer("bit_values", 2 ** torch.arange(self.codebook_bits), persistent=False)


    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """(..., d) signs -> (...) int64 indices."""
        return ((codes > 0).long() * self.bit_values).sum(-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(...) indices -> (..., d) codes in {-1, +1}."""
        return ((indices[..., None] & self.bit_values) > 0).float() * 2 - 1

    def _quantize(self, z: Tensor) -> QuantizerOutput:
        latents = self.project_in(to_tokens(z))
        codes = torch.where(latents > 0, 1.0, -1.0)
        indices = self.codes_to_indices(codes)
        commitment = F.mse_loss(latents, codes)  # codes carry no gradient

        bit_logits = latents * (4 / self.entropy_temperature)
        sample_entropy = binary_entropy(bit_logits).sum(1).mean()
        block = max(1, CODE_PROBS_BUDGET >> self.codebook_bits)
        average = _AverageCodeProbabilities.apply(bit_logits, block)
        codebook_entropy = -(average * (average + ENTROPY_EPS).log()).sum()
        entropy = self.sample_entropy_weight * sample_entropy - self.codebook_entropy_weight * codebook_entropy
        loss = self.commitment_weight * commitment + self.entropy_weight * entropy

        quantized = latents + (codes - latents).detach()
        stats = {
            "loss/commitment": commitment.detach(),
            "loss/entropy": entropy.detach(),
            "entropy/sample": sample_entropy.detach(),
            "entropy/codebook": codebook_entropy.detach(),
            **batch_usage_stats(indices, self.codebook_size),
        }
        return QuantizerOutput.from_tokens(self.project_out(quantized), indices, loss, stats, z.shape)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.project_out(self.indices_to_codes(indices)).permute(0, 3, 1, 2)
