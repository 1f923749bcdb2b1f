"""Triton kernels for chunked IBQ on a GPU, forward and backward (ibq.quantizers.chunked's notation).

`chunked.py` runs blocks of tokens through torch: each block's logits are written to memory and read
back by a handful of passes (max, exp, sums). Here one kernel per pass computes a tile of logits with
`tl.dot` and reduces it in registers, so no logits ever reach memory:

- `row_statistics`: per token, argmax_k L, m = max_k L, log sum_k exp((L - m) / T) and the entropy
  H(q_n), all kept online over a range of codes (rescaled whenever a later tile raises the maximum),
  then the ranges merged the same way;
- `code_averages`: per code, qbar_k = mean_n q_nk, summed over the tokens in a fixed order;
- `logit_gradients`: the backward pass. One kernel takes the row sums of both softmax Jacobians'
  centres, then dLoss/dL is recomputed tile by tile and multiplied by the codebook (one kernel per
  token tile: the tokens' gradient) and by the tokens (one kernel per code tile: the codebook's).

The kernels that run per token tile share each tile's codes out over a few ranges (`_split_codes`), so
that 4096 tokens still fill a GPU. Memory beyond the inputs and gradients is O(N * D * ranges + K).
Products are IEEE fp32 (`input_precision="ieee"`), as the dense path's GEMM, so the argmax agrees with
it; on a GPU every kernel computes a logit as the same chain of fused multiply-adds over D, whatever its
tile, so the code that holds a row's maximum gets L - m = 0 exactly in every pass, as in chunked.py.
They stay IEEE when torch's float32 matmul precision allows TF32: the backward kernels recompute the
logits and must get the forward's bits (the softmax Jacobian's centre cancels the codes' shared direction
only then), and a TF32 tensor-core sum (or tf32x3's three) depends on the tile shape and operand order.
Sums are taken in a fixed order: no atomics, the same bits on every run. On CPU the kernels run under
Triton's interpreter (TRITON_INTERPRET=1), which the tests use."""

import functools

import torch
from torch import Tensor

from ibq.inductor import gpu_kernels_unavailable

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only builds of torch come without Triton
    triton = None

# Tiles (tokens x codes, and the slice of D each tl.dot takes; tl.dot needs at least 16) and warps per
# kernel, chosen by compiling for sm_90 at D = 256 (python -m benchmarks.bench_kernels): no kernel
# spills registers, and each takes the tile with the largest share of FMAs among the instructions of its
# loop. The gradient kernels' (tokens or codes) x D accumulator leaves room for no larger tile. A logit
# does not depend on the tiles on a GPU (see the backward pass), so the kernels may differ; under the
# interpreter, whose tl.dot is numpy's, it does depend on BLOCK_D, which all share.
ROW_STATISTICS_TILES = dict(BLOCK_N=128, BLOCK_K=64, BLOCK_D=32, num_warps=8)
CODE_AVERAGE_TILES = dict(BLOCK_N=64, BLOCK_K=128, BLOCK_D=32, num_warps=8)
ROW_SUMS_TILES = dict(BLOCK_N=64, BLOCK_K=64, BLOCK_D=32, num_warps=8)
TOKEN_GRADIENT_TILES = dict(BLOCK_N=32, BLOCK_K=64, BLOCK_D=32, num_warps=8)
CODEBOOK_GRADIENT_TILES = dict(BLOCK_N=64, BLOCK_K=32, BLOCK_D=32, num_warps=8)


def available(tokens: Tensor) -> bool:
    """Whether the kernels serve these tokens: CUDA tensors on a GPU Triton compiles for."""
    return triton is not None and tokens.is_cuda and gpu_kernels_unavailable(tokens.device) is None


if triton is not None:

    @triton.jit
    def _logit_tile(z_ptr, e_ptr, rows, codes, d, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """L for a (rows x codes) tile, accumulated over slices of the D dimensions. `rows` and `codes`
        are in range: the kernels read a partial tile's surplus rows and codes as real ones (index % n,
        index % k) and drop their results, so that no load in the innermost loop needs a row or code mask."""
        logits = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_ok = dims < d
            z = tl.load(z_ptr + rows[:, None] * d + dims[None, :], mask=dim_ok[None, :], other=0.0)
            e = tl.load(e_ptr + codes[:, None] * d + dims[None, :], mask=dim_ok[None, :], other=0.0)
            logits += tl.dot(z, tl.trans(e), input_precision="ieee")
        return logits

    @triton.jit
    def _row_statistics_kernel(z_ptr, e_ptr, partial_ptr, index_ptr, n, k, d, codes_per_split, inv_temperature,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """Over one range of codes: max_k L, its first argmax, sum_k exp(a_nk) and sum_k exp(a_nk) a_nk
        with a = (L - max) / T, stored as partial[0..2, split, n] and index[split, n]."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        split = tl.program_id(1)
        best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        best_index = tl.zeros((BLOCK_N,), tl.int64)
        sharp_sum = tl.zeros((BLOCK_N,), tl.float32)  # sum_k exp(a_nk), a = (L - m) / T
        weighted_sum = tl.zeros((BLOCK_N,), tl.float32)  # sum_k exp(a_nk) a_nk
        first = split * codes_per_split
        for start in range(first, tl.minimum(first + codes_per_split, k), BLOCK_K):
            codes = start + tl.arange(0, BLOCK_K)
            code_ok = codes < k
            logits = _logit_tile(z_ptr, e_ptr, rows % n, codes % k, d, BLOCK_N, BLOCK_K, BLOCK_D)
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
        out = split * n + rows
        plane = tl.num_programs(1) * n
        tl.store(index_ptr + out, best_index, mask=row_ok)
        tl.store(partial_ptr + out, best, mask=row_ok)
        tl.store(partial_ptr + plane + out, sharp_sum, mask=row_ok)
        tl.store(partial_ptr + 2 * plane + out, weighted_sum, mask=row_ok)

    @triton.jit
    def _code_average_kernel(z_ptr, e_ptr, max_ptr, log_sum_ptr, average_ptr, n, k, d, inv_temperature,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        code_ok = codes < k
        total = tl.zeros((BLOCK_K,), tl.float32)
        for start in range(0, n, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            row_ok = rows < n
            logits = _logit_tile(z_ptr, e_ptr, rows % n, codes % k, d, BLOCK_N, BLOCK_K, BLOCK_D)
            row_max = tl.load(max_ptr + rows % n)
            log_sum = tl.load(log_sum_ptr + rows % n)
            q = tl.exp((logits - row_max[:, None]) * inv_temperature - log_sum[:, None])
            total += tl.sum(tl.where(row_ok[:, None], q, 0.0), axis=0)
        tl.store(average_ptr + codes, total / n, mask=code_ok)


    # -- the backward pass ---------------------------------------------------------------------------
    # A logit is the same FMA chain whichever operand comes first and whatever the tile's shape and the
    # warps (an IEEE fp32 tl.dot is lowered to fused multiply-adds over D in order, from the accumulator
    # it is added to): so the codebook's kernel computes its tiles transposed, codes x tokens, and needs
    # no transpose of its gradient tile, which would spill registers.

    @triton.jit
    def _log_sharp(shifted, log_sharp_sum, inv_temperature, exp_floor):
        """log q = (L - m) / T - log sum exp((L - m) / T), clamped as chunked.py's (operands broadcast)."""
        return tl.maximum(shifted * inv_temperature - log_sharp_sum, exp_floor)

    @triton.jit
    def _logit_gradient(shifted, dots, valid, log_soft_sum, soft_centre, log_sharp_sum, sharp_centre, code_term,
                        inv_temperature, scaled_sample_weight, exp_floor,
                        SOFT: tl.constexpr, ENTROPY: tl.constexpr, CODE_WEIGHT: tl.constexpr):
        """dLoss/dL of a tile, p_nk (G_n.e_k - centre_n) + q_nk (x_nk - centre'_n) / (N T), zero outside
        `valid`; per-token and per-code operands come broadcast to the tile's orientation."""
        grad = tl.zeros(shifted.shape, tl.float32)
        if SOFT:
            grad = (dots - soft_centre) * tl.exp(tl.maximum(shifted - log_soft_sum, exp_floor))
        if ENTROPY:
            log_sharp = _log_sharp(shifted, log_sharp_sum, inv_temperature, exp_floor)
            term = log_sharp * -scaled_sample_weight
            if CODE_WEIGHT:
                term += code_term
            grad += tl.exp(log_sharp) * (term - sharp_centre)
        return tl.where(valid, grad, 0.0)

    @triton.jit
    def _centre_terms(shifted, dots, valid, log_sharp_sum, code_weight, sample_weight, inv_temperature, exp_floor,
                      SOFT: tl.constexpr, ENTROPY: tl.constexpr, CODE_WEIGHT: tl.constexpr):
        """The terms of the four row sums that centre both softmax Jacobians, elementwise (zero outside
        `valid`, and where a path is off): p~ = exp(L - m), p~ G.e, q and q (w - g_s log q)."""
        unnormalised = tl.zeros(shifted.shape, tl.float32)
        soft_term = tl.zeros(shifted.shape, tl.float32)
        sharp = tl.zeros(shifted.shape, tl.float32)
        sharp_term = tl.zeros(shifted.shape, tl.float32)
        if SOFT:
            unnormalised = tl.where(valid, tl.exp(tl.maximum(shifted, exp_floor)), 0.0)
            soft_term = dots * unnormalised
        if ENTROPY:
            log_sharp = _log_sharp(shifted, log_sharp_sum, inv_temperature, exp_floor)
            sharp = tl.where(valid, tl.exp(log_sharp), 0.0)
            weights = log_sharp * -sample_weight
            if CODE_WEIGHT:
                weights += code_weight
            sharp_term = weights * sharp
        return unnormalised, soft_term, sharp, sharp_term

    @triton.jit
    def _whole_rows(ptr, index, index_ok, d, DIMS: tl.constexpr):
        """Rows `index` of a (rows, d) matrix, all d columns (zero outside)."""
        dims = tl.arange(0, DIMS)
        return tl.load(ptr + index[:, None] * d + dims[None, :], mask=index_ok[:, None] & (dims < d)[None, :], other=0.0)

    @triton.jit
    def _row_sums_kernel(z_ptr, g_ptr, e_ptr, max_ptr, log_sharp_sum_ptr, code_weight_ptr, sums_ptr, n, k, d, codes_per_split,
                         inv_temperature, sample_weight_ptr, exp_floor, SOFT: tl.constexpr, ENTROPY: tl.constexpr,
                         CODE_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """Over one range of codes: sum_k p~_nk, sum_k p~_nk G_n.e_k (p~ = exp(L - m)), sum_k q_nk and
        sum_k q_nk (w_k - g_s log q_nk), stored as sums[0..3, split, n]."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        split = tl.program_id(1)
        row_max = tl.load(max_ptr + rows % n)[:, None]
        log_sharp_sum = tl.load(log_sharp_sum_ptr + rows % n)[:, None]
        sample_weight = tl.load(sample_weight_ptr)
        soft_sum = tl.zeros((BLOCK_N,), tl.float32)
        soft_dot = tl.zeros((BLOCK_N,), tl.float32)
        sharp_sum = tl.zeros((BLOCK_N,), tl.float32)
        sharp_dot = tl.zeros((BLOCK_N,), tl.float32)
        first = split * codes_per_split
        for start in range(first, tl.minimum(first + codes_per_split, k), BLOCK_K):
            codes = start + tl.arange(0, BLOCK_K)
            code_ok = codes < k
            valid = row_ok[:, None] & code_ok[None, :]
            shifted = _logit_tile(z_ptr, e_ptr, rows % n, codes % k, d, BLOCK_N, BLOCK_K, BLOCK_D) - row_max
            dots = shifted
            if SOFT:
                dots = _logit_tile(g_ptr, e_ptr, rows % n, codes % k, d, BLOCK_N, BLOCK_K, BLOCK_D)
            code_weight = 0.0
            if CODE_WEIGHT:
                code_weight = tl.load(code_weight_ptr + codes % k)[None, :]
            unnormalised, soft_term, sharp, sharp_term = _centre_terms(shifted, dots, valid, log_sharp_sum, code_weight, sample_weight,
                                                                       inv_temperature, exp_floor, SOFT, ENTROPY, CODE_WEIGHT)
            soft_sum += tl.sum(unnormalised, axis=1)
            soft_dot += tl.sum(soft_term, axis=1)
            sharp_sum += tl.sum(sharp, axis=1)
            sharp_dot += tl.sum(sharp_term, axis=1)
        out = sums_ptr + split * n + rows
        plane = tl.num_programs(1) * n
        tl.store(out, soft_sum, mask=row_ok)
        tl.store(out + plane, soft_dot, mask=row_ok)
        tl.store(out + 2 * plane, sharp_sum, mask=row_ok)
        tl.store(out + 3 * plane, sharp_dot, mask=row_ok)

    @triton.jit
    def _token_gradient_kernel(z_ptr, g_ptr, e_ptr, max_ptr, log_sharp_sum_ptr, log_soft_sum_ptr, soft_centre_ptr, sharp_centre_ptr,
                               code_term_ptr, out_ptr, n, k, d, codes_per_split, inv_temperature, scaled_sample_weight_ptr, exp_floor,
                               SOFT: tl.constexpr, ENTROPY: tl.constexpr, CODE_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DIMS: tl.constexpr):
        """out[split, rows] = sum over this split's codes of dLoss/dL_nk e_k; tiles tokens x codes."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        split = tl.program_id(1)
        row_max = tl.load(max_ptr + rows % n)[:, None]
        log_soft_sum = tl.load(log_soft_sum_ptr + rows % n)[:, None]
        soft_centre = tl.load(soft_centre_ptr + rows % n)[:, None]
        log_sharp_sum = tl.load(log_sharp_sum_ptr + rows % n)[:, None]
        sharp_centre = tl.load(sharp_centre_ptr + rows % n)[:, None]
        scaled_sample_weight = tl.load(scaled_sample_weight_ptr)
        total = tl.zeros((BLOCK_N, DIMS), tl.float32)
        first = split * codes_per_split
        for start in range(first, tl.minimum(first + codes_per_split, k), BLOCK_K):
            codes = start + tl.arange(0, BLOCK_K)
            code_ok = codes < k
            shifted = _logit_tile(z_ptr, e_ptr, rows % n, codes % k, d, BLOCK_N, BLOCK_K, BLOCK_D) - row_max
            dots = shifted
            if SOFT:
                dots = _logit_tile(g_ptr, e_ptr, rows % n, codes % k, d, BLOCK_N, BLOCK_K, BLOCK_D)
            code_term = tl.load(code_term_ptr + codes % k)[None, :] if CODE_WEIGHT else 0.0
            grad = _logit_gradient(shifted, dots, row_ok[:, None] & code_ok[None, :], log_soft_sum, soft_centre, log_sharp_sum,
                                   sharp_centre, code_term, inv_temperature, scaled_sample_weight, exp_floor, SOFT, ENTROPY, CODE_WEIGHT)
            total += tl.dot(grad, _whole_rows(e_ptr, codes, code_ok, d, DIMS), input_precision="ieee")
        dims = tl.arange(0, DIMS)
        tl.store(out_ptr + (split * n + rows[:, None]) * d + dims[None, :], total, mask=row_ok[:, None] & (dims < d)[None, :])

    @triton.jit
    def _codebook_gradient_kernel(z_ptr, g_ptr, e_ptr, max_ptr, log_sharp_sum_ptr, log_soft_sum_ptr, soft_centre_ptr, sharp_centre_ptr,
                                  code_term_ptr, out_ptr, n, k, d, inv_temperature, scaled_sample_weight_ptr, exp_floor,
                                  SOFT: tl.constexpr, ENTROPY: tl.constexpr, CODE_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DIMS: tl.constexpr):
        """out[codes] += sum over all tokens of dLoss/dL_nk z_n, the tokens in a fixed order; tiles codes x tokens."""
        codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        code_ok = codes < k
        dims = tl.arange(0, DIMS)
        out = out_ptr + codes[:, None] * d + dims[None, :]
        out_ok = code_ok[:, None] & (dims < d)[None, :]
        code_term = tl.load(code_term_ptr + codes % k)[:, None] if CODE_WEIGHT else 0.0
        scaled_sample_weight = tl.load(scaled_sample_weight_ptr)
        total = tl.load(out, mask=out_ok, other=0.0)
        for start in range(0, n, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            row_ok = rows < n
            row_max = tl.load(max_ptr + rows % n)[None, :]
            shifted = _logit_tile(e_ptr, z_ptr, codes % k, rows % n, d, BLOCK_K, BLOCK_N, BLOCK_D) - row_max
            dots = shifted
            if SOFT:
                dots = _logit_tile(e_ptr, g_ptr, codes % k, rows % n, d, BLOCK_K, BLOCK_N, BLOCK_D)
            grad = _logit_gradient(
                shifted, dots, code_ok[:, None] & row_ok[None, :],
                tl.load(log_soft_sum_ptr + rows % n)[None, :],
                tl.load(soft_centre_ptr + rows % n)[None, :],
                tl.load(log_sharp_sum_ptr + rows % n)[None, :],
                tl.load(sharp_centre_ptr + rows % n)[None, :],
                code_term, inv_temperature, scaled_sample_weight, exp_floor, SOFT, ENTROPY, CODE_WEIGHT,
            )
            total += tl.dot(grad, _whole_rows(z_ptr, rows, row_ok, d, DIMS), input_precision="ieee")
        tl.store(out, total, mask=out_ok)

    # -- row kernels: the elementwise work of chunked.py's blocks, around cuBLAS's GEMMs ---------------
    # A program streams one range of codes of one token's row of a block's logits (and gradient dots) in
    # tiles, each lane of a tile keeping its own running values, reduced at the end; the ranges' results
    # are merged by torch in a fixed order. Three reads of the logits forward and two (with the dots)
    # backward, where torch's elementwise ops pass over them about ten and twenty times.

    @triton.jit
    def _row_range_tile(logits_ptr, dots_ptr, code_ptr, offset, start, k, row_max, SOFT: tl.constexpr, CODES: tl.constexpr,
                        BLOCK_K: tl.constexpr):
        """The tile of one row from code `start`: its codes, which of them are < k, L - m, the gradient dots
        (L - m again where SOFT is off) and a per-code value (0 where CODES is off)."""
        codes = start + tl.arange(0, BLOCK_K)
        valid = codes < k
        shifted = tl.load(logits_ptr + offset + codes, mask=valid, other=0.0) - row_max
        dots = shifted
        if SOFT:
            dots = tl.load(dots_ptr + offset + codes, mask=valid, other=0.0)
        per_code = shifted * 0.0
        if CODES:
            per_code = tl.load(code_ptr + codes, mask=valid, other=0.0)
        return codes, valid, shifted, dots, per_code

    @triton.jit
    def _block_max_kernel(logits_ptr, max_ptr, index_ptr, rows, k, codes_per_split, BLOCK_K: tl.constexpr):
        """max_k L over one range of a row, and the first code holding it, at [split, row]."""
        row, split = tl.program_id(0), tl.program_id(1)
        logits_ptr += row.to(tl.int64) * k
        lanes = tl.arange(0, BLOCK_K)
        lane_max = tl.full((BLOCK_K,), float("-inf"), tl.float32)
        lane_index = tl.zeros((BLOCK_K,), tl.int64)
        first = split * codes_per_split
        for start in range(first, tl.minimum(first + codes_per_split, k), BLOCK_K):
            codes = start + lanes
            logits = tl.load(logits_ptr + codes, mask=codes < k, other=float("-inf"))
            greater = logits > lane_max  # strictly: each lane keeps its earliest maximum
            lane_index = tl.where(greater, codes.to(tl.int64), lane_index)
            lane_max = tl.where(greater, logits, lane_max)
        range_max = tl.max(lane_max, axis=0)
        tl.store(max_ptr + split * rows + row, range_max)
        tl.store(index_ptr + split * rows + row, tl.min(tl.where(lane_max == range_max, lane_index, k), axis=0))

    @triton.jit
    def _block_sharp_kernel(logits_ptr, max_ptr, log_sharp_sum_ptr, out_ptr, rows, k, codes_per_split, inv_temperature,
                            exp_floor, NORMALISED: tl.constexpr, BLOCK_K: tl.constexpr):
        """Over one range of a row, at out[split, row]: sum_k exp((L - m) / T); or, NORMALISED (given
        log sum_k exp((L - m) / T)), sum_k q log q, with q written over the logits."""
        row, split = tl.program_id(0), tl.program_id(1)
        logits_ptr += row.to(tl.int64) * k
        row_max = tl.load(max_ptr + row)
        lanes = tl.arange(0, BLOCK_K)
        lane_sum = tl.zeros((BLOCK_K,), tl.float32)
        first = split * codes_per_split
        for start in range(first, tl.minimum(first + codes_per_split, k), BLOCK_K):
            codes = start + lanes
            shifted = tl.load(logits_ptr + codes, mask=codes < k, other=0.0) - row_max
            if NORMALISED:
                log_sharp = _log_sharp(shifted, tl.load(log_sharp_sum_ptr + row), inv_temperature, exp_floor)
                sharp = tl.exp(log_sharp)
                lane_sum += tl.where(codes < k, sharp * log_sharp, 0.0)
                tl.store(logits_ptr + codes, sharp, mask=codes < k)
            else:
                lane_sum += tl.where(codes < k, tl.exp(tl.maximum(shifted * inv_temperature, exp_floor)), 0.0)
        tl.store(out_ptr + split * rows + row, tl.sum(lane_sum, axis=0))

    @triton.jit
    def _block_sums_kernel(logits_ptr, dots_ptr, max_ptr, log_sharp_sum_ptr, code_weight_ptr, sample_weight_ptr, sums_ptr,
                           rows, k, codes_per_split, inv_temperature, exp_floor, SOFT: tl.constexpr, ENTROPY: tl.constexpr,
                           CODE_WEIGHT: tl.constexpr, BLOCK_K: tl.constexpr):
        """Over one range of a row: sum_k p~_nk, sum_k p~_nk G_n.e_k (p~ = exp(L - m)), sum_k q_nk and
        sum_k q_nk (w_k - g_s log q_nk), at sums[0..3, split, row]."""
        row, split = tl.program_id(0), tl.program_id(1)
        offset = row.to(tl.int64) * k
        row_max = tl.load(max_ptr + row)
        log_sharp_sum = tl.load(log_sharp_sum_ptr + row)
        sample_weight = tl.load(sample_weight_ptr)
        soft_sum = tl.zeros((BLOCK_K,), tl.float32)
        soft_dot = tl.zeros((BLOCK_K,), tl.float32)
        sharp_sum = tl.zeros((BLOCK_K,), tl.float32)
        sharp_dot = tl.zeros((BLOCK_K,), tl.float32)
        first = split * codes_per_split
        for start in range(first, tl.minimum(first + codes_per_split, k), BLOCK_K):
            codes, valid, shifted, dots, code_weight = _row_range_tile(logits_ptr, dots_ptr, code_weight_ptr, offset, start, k, row_max,
                                                                       SOFT, CODE_WEIGHT, BLOCK_K)
            unnormalised, soft_term, sharp, sharp_term = _centre_terms(shifted, dots, valid, log_sharp_sum, code_weight, sample_weight,
                                                                       inv_temperature, exp_floor, SOFT, ENTROPY, CODE_WEIGHT)
            soft_sum += unnormalised
            soft_dot += soft_term
            sharp_sum += sharp
            sharp_dot += sharp_term
        out = sums_ptr + split * rows + row
        plane = tl.num_programs(1) * rows
        tl.store(out, tl.sum(soft_sum, axis=0))
        tl.store(out + plane, tl.sum(soft_dot, axis=0))
        tl.store(out + 2 * plane, tl.sum(sharp_sum, axis=0))
        tl.store(out + 3 * plane, tl.sum(sharp_dot, axis=0))

    @triton.jit
    def _block_gradient_kernel(logits_ptr, dots_ptr, grad_ptr, max_ptr, log_sharp_sum_ptr, log_soft_sum_ptr, soft_centre_ptr,
                               sharp_centre_ptr, code_term_ptr, scaled_sample_weight_ptr, k, codes_per_split, inv_temperature,
                               exp_floor, SOFT: tl.constexpr, ENTROPY: tl.constexpr, CODE_WEIGHT: tl.constexpr,
                               BLOCK_K: tl.constexpr):
        """dLoss/dL over one range of a row, written over `grad_ptr`'s (the dots' or the logits' buffer: each
        element is read before it is written)."""
        row, split = tl.program_id(0), tl.program_id(1)
        offset = row.to(tl.int64) * k
        row_max = tl.load(max_ptr + row)
        log_sharp_sum = tl.load(log_sharp_sum_ptr + row)
        log_soft_sum = tl.load(log_soft_sum_ptr + row)
        soft_centre = tl.load(soft_centre_ptr + row)
        sharp_centre = tl.load(sharp_centre_ptr + row)
        scaled_sample_weight = tl.load(scaled_sample_weight_ptr)
        first = split * codes_per_split
        for start in range(first, tl.minimum(first + codes_per_split, k), BLOCK_K):
            codes, valid, shifted, dots, code_term = _row_range_tile(logits_ptr, dots_ptr, code_term_ptr, offset, start, k, row_max,
                                                                     SOFT, CODE_WEIGHT, BLOCK_K)
            grad = _logit_gradient(shifted, dots, valid, log_soft_sum, soft_centre, log_sharp_sum, sharp_centre, code_term,
                                   inv_temperature, scaled_sample_weight, exp_floor, SOFT, ENTROPY, CODE_WEIGHT)
            tl.store(grad_ptr + offset + codes, grad, mask=valid)


def row_statistics(tokens: Tensor, codebook: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(indices, max_logit, log_sharp_sum, token_entropy) of (N, D) fp32 tokens against a (K, D) codebook."""
    n, d = tokens.shape
    k = codebook.shape[0]
    row_tiles, splits, codes_per_split = _split_codes(tokens, n, k, ROW_STATISTICS_TILES)
    partial = torch.empty(3, splits, n, dtype=torch.float32, device=tokens.device)
    split_indices = torch.empty(splits, n, dtype=torch.long, device=tokens.device)
    _row_statistics_kernel[(row_tiles, splits)](
        tokens.contiguous(), codebook.contiguous(), partial, split_indices, n, k, d, codes_per_split, 1.0 / temperature, **ROW_STATISTICS_TILES,
    )
    # The ranges merged as the kernel merges its tiles: the first range holding the maximum gives the
    # index (argmax returns the first of equal values), and the sums move to the overall maximum.
    split_max, split_sum, split_weighted = partial
    best = split_max.argmax(0, keepdim=True)
    max_logit = split_max.gather(0, best)
    shift = (split_max - max_logit) * (1.0 / temperature)
    rescale = shift.exp()
    sharp_sum = (rescale * split_sum).sum(0)
    weighted_sum = (rescale * (split_weighted + shift * split_sum)).sum(0)
    log_sharp_sum = sharp_sum.log()
    # H(q_n) = log S - sum_k q_nk a_nk
    return split_indices.gather(0, best)[0], max_logit[0], log_sharp_sum, log_sharp_sum - weighted_sum / sharp_sum


def code_averages(tokens: Tensor, codebook: Tensor, temperature: float, max_logit: Tensor, log_sharp_sum: Tensor) -> Tensor:
    """qbar_k = mean_n softmax(L_n / T)_k, (K,)."""
    n, d = tokens.shape
    k = codebook.shape[0]
    average = torch.empty(k, dtype=torch.float32, device=tokens.device)
    _code_average_kernel[(triton.cdiv(k, CODE_AVERAGE_TILES["BLOCK_K"]),)](
        tokens.contiguous(), codebook.contiguous(), max_logit, log_sharp_sum, average, n, k, d, 1.0 / temperature, **CODE_AVERAGE_TILES,
    )
    return average


def _split_codes(tokens: Tensor, n: int, k: int, tiles: dict) -> tuple[int, int, int]:
    """(row tiles, splits, codes per split): the kernels over token tiles share each tile's codes out over
    `splits` ranges, since N = 4096 tokens are only 32 to 128 row tiles, too few programs to fill a GPU.
    Under the interpreter: 2 ranges, so that the split is exercised."""
    row_tiles, code_tiles = triton.cdiv(n, tiles["BLOCK_N"]), triton.cdiv(k, tiles["BLOCK_K"])
    if tokens.is_cuda:
        splits = code_splits(row_tiles, code_tiles, torch.cuda.get_device_properties(tokens.device).multi_processor_count)
    else:
        splits = min(2, code_tiles)
    codes_per_split = triton.cdiv(code_tiles, splits) * tiles["BLOCK_K"]
    return row_tiles, triton.cdiv(k, codes_per_split), codes_per_split  # no range left empty


@functools.lru_cache
def code_splits(row_tiles: int, code_tiles: int, multiprocessors: int) -> int:
    """How many code ranges each row tile's work is cut into. A program holds a multiprocessor alone
    (over 128 registers per thread at 8 warps: python -m benchmarks.bench_kernels), so with s ranges
    the kernel runs ceil(row_tiles * s / multiprocessors) waves of programs that each take 1 / s of the
    codes: the fewest ranges that minimise that product, among up to 8 waves' worth."""
    most = min(code_tiles, 8 * triton.cdiv(multiprocessors, row_tiles))
    return min(range(1, most + 1), key=lambda splits: (triton.cdiv(row_tiles * splits, multiprocessors) / splits, splits))


def logit_gradients(tokens: Tensor, codebook: Tensor, temperature: float, max_logit: Tensor, log_sharp_sum: Tensor,
                    grad_z_q: Tensor | None, sample_weight: Tensor | None, code_weight: Tensor | None, exp_floor: float,
                    grad_codebook: Tensor | None) -> Tensor:
    """The backward pass through the logits, chunked.py's elementwise passes fused: returns dLoss/dtokens and adds
    dLoss/dcodebook to `grad_codebook` (when given). `grad_z_q` is the gradient of the straight-through
    z_q, `sample_weight` (0-d) that of the sample entropy, `code_weight` w_k = dLoss/dqbar_k; None where
    unused, and one of the three in use. All stay on the device: nothing here waits for it."""
    n, d = tokens.shape
    k = codebook.shape[0]
    tokens, codebook = tokens.contiguous(), codebook.contiguous()
    flags = dict(SOFT=grad_z_q is not None, ENTROPY=sample_weight is not None or code_weight is not None,
                 CODE_WEIGHT=code_weight is not None)
    # A path not in use is a flag off: its pointer is never read, so any tensor stands in for it.
    gradient = tokens if grad_z_q is None else grad_z_q.contiguous()
    code_weight = max_logit if code_weight is None else code_weight.contiguous()
    sample_weight = tokens.new_zeros(()) if sample_weight is None else sample_weight.float()

    # The centres of both softmax Jacobians, divided by the probability sums as computed (see chunked.py).
    row_tiles, splits, codes_per_split = _split_codes(tokens, n, k, ROW_SUMS_TILES)
    sums = torch.empty(4, splits, n, dtype=torch.float32, device=tokens.device)
    _row_sums_kernel[(row_tiles, splits)](
        tokens, gradient, codebook, max_logit, log_sharp_sum, code_weight, sums, n, k, d, codes_per_split,
        1.0 / temperature, sample_weight, exp_floor, **flags, **ROW_SUMS_TILES,
    )
    soft_sum, soft_dot, sharp_sum, sharp_dot = sums.sum(1)  # over the splits, in a fixed order
    scale = 1.0 / (n * temperature)
    rows = (log_sharp_sum, soft_sum.log(), soft_dot / soft_sum, sharp_dot / sharp_sum * scale, code_weight * scale)
    common = (n, k, d)
    scalars = (1.0 / temperature, sample_weight * scale, exp_floor)
    dims = max(16, triton.next_power_of_2(d))  # tl.dot needs tiles of at least 16

    row_tiles, splits, codes_per_split = _split_codes(tokens, n, k, TOKEN_GRADIENT_TILES)
    partial = torch.empty(splits, n, d, dtype=torch.float32, device=tokens.device)
    _token_gradient_kernel[(row_tiles, splits)](
        tokens, gradient, codebook, max_logit, *rows, partial, *common, codes_per_split, *scalars, **flags,
        **TOKEN_GRADIENT_TILES, DIMS=dims,
    )
    if grad_codebook is not None:
        _codebook_gradient_kernel[(triton.cdiv(k, CODEBOOK_GRADIENT_TILES["BLOCK_K"]),)](
            tokens, gradient, codebook, max_logit, *rows, grad_codebook, *common, *scalars, **flags,
            **CODEBOOK_GRADIENT_TILES, DIMS=dims,
        )
    return partial.sum(0)


# Codes per tile and warps of the row kernels: a tile of 2048 fp32 codes is 8 per thread of 8 warps,
# loads of 32 bytes per thread.
ROW_TILES = dict(BLOCK_K=2048, num_warps=8)


def _row_splits(logits: Tensor) -> tuple[int, int]:
    """(splits, codes per split) for the row kernels over a block's (M, K) logits: each row cut into ranges
    of whole tiles, so that the programs number about four per multiprocessor (a block of 128 rows alone
    would leave a GPU's memory bandwidth mostly unused). Under the interpreter: 2, so that the merge is
    exercised."""
    rows, k = logits.shape
    tiles = triton.cdiv(k, ROW_TILES["BLOCK_K"])
    wanted = triton.cdiv(4 * torch.cuda.get_device_properties(logits.device).multi_processor_count, rows) if logits.is_cuda else 2
    codes_per_split = triton.cdiv(tiles, max(1, min(tiles, wanted))) * ROW_TILES["BLOCK_K"]
    return triton.cdiv(k, codes_per_split), codes_per_split  # no range left empty


def block_statistics(logits: Tensor, max_logit: Tensor, indices: Tensor, log_sharp_sum: Tensor, token_entropy: Tensor,
                     temperature: float, exp_floor: float) -> Tensor:
    """For a block's (M, K) logits: fills the (M,) max_logit, indices, log_sharp_sum and token_entropy, and
    returns the logits' buffer holding q = softmax(L / T)."""
    rows, k = logits.shape
    splits, codes_per_split = _row_splits(logits)
    grid, common = (rows, splits), (rows, k, codes_per_split)
    range_max = logits.new_empty(splits, rows)
    range_index = torch.empty(splits, rows, dtype=torch.long, device=logits.device)
    _block_max_kernel[grid](logits, range_max, range_index, *common, **ROW_TILES)
    best = range_max.argmax(0, keepdim=True)  # the first range holding the maximum: argmax over all K's tie rule
    max_logit.copy_(range_max.gather(0, best)[0])
    indices.copy_(range_index.gather(0, best)[0])
    partial = logits.new_empty(splits, rows)
    scalars = (1.0 / temperature, exp_floor)
    _block_sharp_kernel[grid](logits, max_logit, max_logit, partial, *common, *scalars, NORMALISED=False, **ROW_TILES)
    torch.log(partial.sum(0), out=log_sharp_sum)
    _block_sharp_kernel[grid](logits, max_logit, log_sharp_sum, partial, *common, *scalars, NORMALISED=True, **ROW_TILES)
    torch.neg(partial.sum(0), out=token_entropy)
    return logits


def block_gradients(logits: Tensor, dots: Tensor | None, max_logit: Tensor, log_sharp_sum: Tensor, sample_weight: Tensor | None,
                    code_weight: Tensor | None, temperature: float, tokens: int, exp_floor: float) -> Tensor:
    """dLoss/dL of a block, (M, K), over the buffer of `dots` (of `logits` where the straight-through
    gradient is unused), for a batch of `tokens` tokens; arguments as logit_gradients'. The centres of
    both softmax Jacobians are divided by the probability sums as computed (see chunked.py)."""
    rows, k = logits.shape
    grad = logits if dots is None else dots
    flags = dict(SOFT=dots is not None, ENTROPY=sample_weight is not None or code_weight is not None,
                 CODE_WEIGHT=code_weight is not None)
    # A path not in use is a flag off: its pointer is never read, so any tensor stands in for it.
    sample_weight = logits.new_zeros(()) if sample_weight is None else sample_weight.float()
    code_weight = max_logit if code_weight is None else code_weight.contiguous()
    splits, codes_per_split = _row_splits(logits)
    grid = (rows, splits)
    sums = logits.new_empty(4, splits, rows)
    _block_sums_kernel[grid](logits, grad, max_logit, log_sharp_sum, code_weight, sample_weight, sums, rows, k, codes_per_split,
                             1.0 / temperature, exp_floor, **flags, **ROW_TILES)
    soft_sum, soft_dot, sharp_sum, sharp_dot = sums.sum(1)  # over the ranges, in a fixed order
    scale = 1.0 / (tokens * temperature)
    _block_gradient_kernel[grid](logits, grad, grad, max_logit, log_sharp_sum, soft_sum.log(), soft_dot / soft_sum,
                                 sharp_dot / sharp_sum * scale, code_weight * scale, sample_weight * scale, k, codes_per_split,
                                 1.0 / temperature, exp_floor, **flags, **ROW_TILES)
    return grad
