"""Triton kernels for the forward pass of chunked IBQ on a GPU (ibq.quantizers.chunked's notation).

`chunked.py` streams codebook slices through torch: each slice's logits are written to memory and read
back by a handful of passes (max, exp, sums). Here one kernel per pass computes a tile of logits with
`tl.dot` and reduces it in registers, so no logits ever reach memory:

- `row_statistics`: per token, argmax_k L, m = max_k L, log sum_k exp((L - m) / T) and the entropy
  H(q_n), all kept online over the codebook (rescaled whenever a later tile raises the maximum);
- `code_averages`: per code, qbar_k = mean_n q_nk, summed over the tokens in a fixed order.

Memory beyond the inputs is O(N + K). Products are IEEE fp32 (`input_precision="ieee"`), as the
dense path's GEMM, so the argmax agrees with it. The backward pass stays chunked.py's. On CPU the
kernels run under Triton's interpreter (TRITON_INTERPRET=1), which the tests use."""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only builds of torch come without Triton
    triton = None

BLOCK_N = 64
BLOCK_K = 64
BLOCK_D = 32  # tl.dot needs tiles of at least 16


def available(tokens: Tensor) -> bool:
    """Whether the kernels serve these tokens: CUDA tensors and Triton installed."""
    return triton is not None and tokens.is_cuda


if triton is not None:

    @triton.jit
    def _logit_tile(z_ptr, e_ptr, rows, codes, row_ok, code_ok, d, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """L for a (rows x codes) tile, accumulated over slices of the D dimensions."""
        logits = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_ok = dims < d
            z = tl.load(z_ptr + rows[:, None] * d + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
            e = tl.load(e_ptr + codes[:, None] * d + dims[None, :], mask=code_ok[:, None] & dim_ok[None, :], other=0.0)
            logits += tl.dot(z, tl.trans(e), input_precision="ieee")
        return logits

    @triton.jit
    def _row_statistics_kernel(z_ptr, e_ptr, index_ptr, max_ptr, log_sum_ptr, entropy_ptr, n, k, d, inv_temperature,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        best_index = tl.zeros((BLOCK_N,), tl.int64)
        sharp_sum = tl.zeros((BLOCK_N,), tl.float32)  # sum_k exp(a_nk), a = (L - m) / T
        weighted_sum = tl.zeros((BLOCK_N,), tl.float32)  # sum_k exp(a_nk) a_nk
        for start in range(0, k, BLOCK_K):
            codes = start + tl.arange(0, BLOCK_K)
            code_ok = codes < k
            logits = _logit_tile(z_ptr, e_ptr, rows, codes, row_ok, code_ok, d, BLOCK_N, BLOCK_K, BLOCK_D)
            logits = tl.where(code_ok[None, :], logits, float("-inf"))
            tile_max = tl.max(logits, axis=1)
            tile_index = tl.argmax(logits, axis=1, tie_break_left=True).to(tl.int64) + start
            # strictly greater: ties keep the earlier code, as argmax over all K does
            best_index = tl.where(tile_max > best, tile_index, best_index)
            new_best = tl.maximum(best, tile_max)
            shift = tl.where(best == float("-inf"), 0.0, (best - new_best) * inv_temperature)
            rescale = tl.exp(shift)
            # the running sums move to the new maximum: a -> a + shift
            weighted_sum = rescale * (weighted_sum + shift * sharp_sum)
            sharp_sum = rescale * sharp_sum
            best = new_best
            a = (logits - best[:, None]) * inv_temperature
            a = tl.where(code_ok[None, :], a, 0.0)
            p = tl.where(code_ok[None, :], tl.exp(a), 0.0)
            sharp_sum += tl.sum(p, axis=1)
            weighted_sum += tl.sum(p * a, axis=1)
        log_sum = tl.log(sharp_sum)
        tl.store(index_ptr + rows, best_index, mask=row_ok)
        tl.store(max_ptr + rows, best, mask=row_ok)
        tl.store(log_sum_ptr + rows, log_sum, mask=row_ok)
        # H(q_n) = log S - sum_k q_nk a_nk
        tl.store(entropy_ptr + rows, log_sum - weighted_sum / sharp_sum, mask=row_ok)

    @triton.jit
    def _code_average_kernel(z_ptr, e_ptr, max_ptr, log_sum_ptr, average_ptr, n, k, d, inv_temperature,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        code_ok = codes < k
        total = tl.zeros((BLOCK_K,), tl.float32)
        for start in range(0, n, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            row_ok = rows < n
            logits = _logit_tile(z_ptr, e_ptr, rows, codes, row_ok, code_ok, d, BLOCK_N, BLOCK_K, BLOCK_D)
            row_max = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
            log_sum = tl.load(log_sum_ptr + rows, mask=row_ok, other=0.0)
            q = tl.exp((logits - row_max[:, None]) * inv_temperature - log_sum[:, None])
            total += tl.sum(tl.where(row_ok[:, None], q, 0.0), axis=0)
        tl.store(average_ptr + codes, total / n, mask=code_ok)


def row_statistics(tokens: Tensor, codebook: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(indices, max_logit, log_sharp_sum, token_entropy) of (N, D) fp32 tokens against a (K, D) codebook."""
    n, d = tokens.shape
    k = codebook.shape[0]
    indices = torch.empty(n, dtype=torch.long, device=tokens.device)
    max_logit, log_sharp_sum, token_entropy = (torch.empty(n, dtype=torch.float32, device=tokens.device) for _ in range(3))
    _row_statistics_kernel[(triton.cdiv(n, BLOCK_N),)](
        tokens.contiguous(), codebook.contiguous(), indices, max_logit, log_sharp_sum, token_entropy, n, k, d, 1.0 / temperature,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
    )
    return indices, max_logit, log_sharp_sum, token_entropy


def code_averages(tokens: Tensor, codebook: Tensor, temperature: float, max_logit: Tensor, log_sharp_sum: Tensor) -> Tensor:
    """qbar_k = mean_n softmax(L_n / T)_k, (K,)."""
    n, d = tokens.shape
    k = codebook.shape[0]
    average = torch.empty(k, dtype=torch.float32, device=tokens.device)
    _code_average_kernel[(triton.cdiv(k, BLOCK_K),)](
        tokens.contiguous(), codebook.contiguous(), max_logit, log_sharp_sum, average, n, k, d, 1.0 / temperature,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
    )
    return average
