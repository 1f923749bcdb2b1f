"""Finite scalar quantization (Mentzer et al. 2023): channel i is bounded and rounded to one of L_i
levels, so the codebook is the implicit grid of prod_i L_i points. No codebook, no auxiliary loss.

Bounding: f(z) = tanh(z + s) h - o with o = 1/2 for even L (whose grid {-L/2, ..., L/2 - 1} is
asymmetric) and 0 for odd L, and the shift s = atanh(o / h) so that f(0) = 0. h = (L - 1)(1 + eps) / 2
as in lucidrains' implementation; the official notebook's (1 - eps) makes o / h > 1 for L = 2, where
atanh is undefined. Rounding is straight-through; the code is round(f(z)) / floor(L/2).
Index: mixed radix, channel 0 the least significant digit, digit_i = code_i floor(L_i/2) + floor(L_i/2).

When `dim` (the encoder's embed_dim) differs from len(levels), linear projections map dim -> len(levels)
before the bounding and back after it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ibq.errors import UserError, check_positive_int
from ibq.quantizers.base import Quantizer, QuantizerOutput, batch_usage_stats, to_tokens

# Default levels per codebook size. The FSQ paper's (Table 1) target about 2^8..2^16 codes; their
# exact sizes are 240, 1000, 4375, 15360 and 64000. Comparisons at equal K need exact powers of two,
# for which the table uses levels of 8 (the paper advises >= 5 levels per channel) completed by 4s.
DEFAULT_LEVELS: dict[int, tuple[int, ...]] = {
    240: (8, 6, 5),
    1000: (8, 5, 5, 5),
    4375: (7, 5, 5, 5, 5),
    15360: (8, 8, 8, 6, 5),
    64000: (8, 8, 8, 5, 5, 5),
    2**8: (8, 8, 4),
    2**9: (8, 8, 8),
    2**10: (8, 8, 4, 4),
    2**11: (8, 8, 8, 4),
    2**12: (8, 8, 8, 8),
    2**13: (8, 8, 8, 4, 4),
    2**14: (8, 8, 8, 8, 4),
    2**15: (8, 8, 8, 8, 8),
    2**16: (8, 8, 8, 8, 4, 4),
    2**17: (8, 8, 8, 8, 8, 4),
    2**18: (8, 8, 8, 8, 8, 8),
    2**19: (8, 8, 8, 8, 8, 4, 4),
    2**20: (8, 8, 8, 8, 8, 8, 4),
}
BOUND_EPS = 1e-3


def resolve_levels(codebook_size: int, levels) -> tuple[int, ...]:
    if levels is None:
        if codebook_size not in DEFAULT_LEVELS:
            raise UserError(
                f"quantizer.codebook_size={codebook_size} has no default FSQ levels (defaults for "
                f"{', '.join(map(str, sorted(DEFAULT_LEVELS)))}): set quantizer.levels=[...] with product {codebook_size}"
            )
        return DEFAULT_LEVELS[codebook_size]
    levels = tuple(levels)
    if not levels or any(isinstance(level, bool) or not isinstance(level, int) or level < 2 for level in levels):
        raise UserError(f"quantizer.levels={list(levels)} is invalid: it must be a list of integers >= 2")
    product = 1
    for level in levels:
        product *= level
    if product != codebook_size:
        raise UserError(
            f"quantizer.levels={list(levels)} has {product} codes but quantizer.codebook_size={codebook_size}: "
            f"the product of the levels must equal the codebook size"
        )
    return levels


class FSQ(Quantizer):
    def __init__(self, codebook_size: int, dim: int, levels: list[int] | None = None):
        super().__init__()
        self.codebook_size = check_positive_int("quantizer.codebook_size", codebook_size)
        self.dim = check_positive_int("quantizer.dim", dim)
        self.levels = resolve_levels(codebook_size, levels)
        code_dim = len(self.levels)
        needs_projection = dim != code_dim
        self.project_in = nn.Linear(dim, code_dim) if needs_projection else nn.Identity()
        self.project_out = nn.Linear(code_dim, dim) if needs_projection else nn.Identity()

        levels_t = torch.tensor(self.levels, dtype=torch.float64)
        half_range = (levels_t - 1) * (1 + BOUND_EPS) / 2
        offset = torch.where(levels_t % 2 == 0, 0.5, 0.0)
        basis = torch.cumprod(torch.tensor((1,) + self.levels[:-1]), 0)
        self.register_buffer("half_range", half_range.float(), persistent=False)
        self.register_buffer("offset", offset.float(), persistent=False)
        self.register_buffer("shift", torch.atanh(offset / half_range).float(), persistent=False)
        self.register_buffer("half_width", (levels_t // 2).float(), persistent=False)
        self.register_buffer("levels_int", torch.tensor(self.levels), persistent=False)
        self.register_buffer("basis", basis, persistent=False)


    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """(..., len(levels)) grid points -> (...) int64 indices."""
        digits = torch.round(codes * self.half_width + self.half_width).long()
        return (digits * self.basis).sum(-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(...) indices -> (..., len(levels)) grid points."""
        digits = (indices[..., None] // self.basis) % self.levels_int
        return (digits - self.half_width) / self.half_width

    def _quantize(self, z: Tensor) -> QuantizerOutput:
        latents = self.project_in(to_tokens(z))
        bounded = torch.tanh(latents + self.shift) * self.half_range - self.offset
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        codes = rounded / self.half_width
        indices = self.codes_to_indices(codes.detach())
        return QuantizerOutput.from_tokens(
            self.project_out(codes), indices, z.new_zeros(()), batch_usage_stats(indices, self.codebook_size), z.shape
        )

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.project_out(self.indices_to_codes(indices)).permute(0, 3, 1, 2)
