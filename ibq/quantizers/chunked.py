"""IBQ and nearest-code search without a tokens x K matrix in memory.

`chunked_ibq` is IBQ's assignment and its softmax / entropy terms, forward and backward, with memory
O(N * chunk + K * D): the logits of one block of tokens against the whole codebook at a time (as many
values as `chunk` codes' logits for every token), recomputed in the backward pass instead of being
stored. A block holds whole rows, so each softmax is normalised where it is computed: one GEMM forward
and four backward (the dense path runs six), and each row's elementwise work is done once.
`nearest_code` is the argmin of the VQ family over codebook slices.

Notation (per token n and code k): L = z . e (logits), m = max_k L, p = softmax(L) (the straight-through
distribution, temperature 1) and q = softmax(L / T) (the entropy distribution, temperature T).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ibq.quantizers import triton_ibq

# The eps of MAGVIT-v2's codebook entropy, -sum_k qbar_k log(qbar_k + eps).
ENTROPY_EPS = 1e-5
# Exponents are clamped from below at this value before exp. Relative to the largest term of a row this
# adds at most K * e^-50 < 3e-16 (K <= 2^20) of its mass, far below fp32 precision, and it keeps every
# exp result and every GEMM operand clear of denormals, which make CPU GEMMs about 100x slower.
EXP_FLOOR = -50.0


# What computes chunked IBQ: "torch" runs cuBLAS (or CPU) GEMMs and torch's elementwise ops on each block
# of tokens; "triton_rows" the same GEMMs with the elementwise work of a block in Triton's row kernels,
# where the tokens are on CUDA; "triton" the fused kernels of ibq.quantizers.triton_ibq there, which keep
# no logits in memory but were measured slower on an H200 (README, "GPU figures"). Off CUDA, torch.
KERNELS = ("torch", "triton_rows", "triton")


def use_triton(tokens: Tensor, kernels: str) -> bool:
    return kernels == "triton" and triton_ibq.available(tokens)


def use_row_kernels(tokens: Tensor, kernels: str) -> bool:
    return kernels == "triton_rows" and triton_ibq.available(tokens)


def weights_stay_on_device(tokens: Tensor, triton: bool) -> bool:
    """Whether the backward pass keeps the entropies' incoming gradients as tensors: on a GPU reading one
    would wait for the device, so a zero one costs some arithmetic; Triton's kernels take them as tensors
    (under the interpreter too); on the host a zero one skips its term."""
    return triton or tokens.is_cuda


def codebook_slices(codebook_size: int, chunk_size: int):
    for start in range(0, codebook_size, chunk_size):
        yield start, min(start + chunk_size, codebook_size)


def _rows(buffer: Tensor, rows: int, cols: int) -> Tensor:
    """A contiguous (rows, cols) view at the start of a preallocated buffer (out= needs contiguity)."""
    return buffer.view(-1)[: rows * cols].view(rows, cols)


@torch.no_grad()
def nearest_code(tokens: Tensor, codebook: Tensor, chunk_size: int = 8192) -> Tensor:
    """argmin_k ||z - e_k||^2 for each token, over codebook slices (||z||^2 does not change the argmin)."""
    best_distance = best_index = None
    buffer = tokens.new_empty(tokens.shape[0] * min(chunk_size, codebook.shape[0]))
    for start, stop in codebook_slices(codebook.shape[0], chunk_size):
        block = codebook[start:stop]
        distances = torch.addmm(block.pow(2).sum(1), tokens, block.t(), alpha=-2, out=_rows(buffer, len(tokens), stop - start))
        distance, index = distances.min(1)
        if best_distance is None:
            best_distance, best_index = distance, index
        else:
            closer = distance < best_distance  # strict: the first minimum wins, as in argmin
            best_distance = torch.where(closer, distance, best_distance)
            best_index = torch.where(closer, index + start, best_index)
    return best_index


def block_rows(tokens: int, codebook_size: int, dim: int, chunk_size: int) -> int:
    """Tokens per block: tokens * chunk_size / codebook_size, so that a block's logits against the whole
    codebook hold as many values as `chunk_size` codes' logits for every token, but at least dim / 2: a
    block's four matrices then hold at most twice the codebook's values, and its GEMMs, whose cost is
    reading the codebook when a block has few tokens, stay efficient."""
    return max(1, min(tokens, max(dim // 2, tokens * chunk_size // codebook_size)))


def _logit_blocks(tokens: Tensor, codebook: Tensor, chunk_size: int, buffers: int, max_logit: Tensor | None = None,
                  gradient: Tensor | None = None):
    """(start, stop, logits, gradient_dots, work) for each block of tokens: logits = tokens[start:stop] @
    codebook.T, minus `max_logit` when given, gradient_dots = gradient[start:stop] @ codebook.T when a
    gradient is given, and `buffers` further work matrices of the same shape.

    Every pass computes the logits with the same GEMM and subtracts the maximum afterwards, so that the
    code that holds the maximum gets a shifted logit of exactly 0 in every pass. A GEMM that adds the shift
    itself (addmm) rounds differently: at |L| ~ 70 that is ~4e-6, which T = 0.01 turns into a 4e-4 error
    in log q and a biased entropy gradient."""
    n, k = tokens.shape[0], codebook.shape[0]
    rows = block_rows(n, k, codebook.shape[1], chunk_size)
    count = 1 + (gradient is not None) + buffers
    storage = tokens.new_empty(count, rows * k)
    codebook_t = codebook.t()
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        matrices = [_rows(storage[i], stop - start, k) for i in range(count)]
        logits = torch.mm(tokens[start:stop], codebook_t, out=matrices.pop(0))
        if max_logit is not None:
            logits.sub_(max_logit[start:stop, None])
        dots = None if gradient is None else torch.mm(gradient[start:stop], codebook_t, out=matrices.pop(0))
        yield start, stop, logits, dots, matrices


def _log_sharp(shifted: Tensor, log_sharp_sum: Tensor, temperature: float) -> Tensor:
    """log q = (L - m) / T - log sum exp((L - m) / T), in place of `shifted`: the large logits cancel
    before the division."""
    return torch.add(-log_sharp_sum[:, None], shifted, alpha=1 / temperature, out=shifted).clamp_(min=EXP_FLOOR)


def _entropy_weights(log_sharp: Tensor, code_weight: Tensor | None, sample_weight: float | Tensor) -> Tensor:
    """w_k - g_s log q_nk in place of `log_sharp`: what q_nk multiplies in the entropy terms' dLoss/dL,
    up to a constant per row (which the softmax Jacobian removes)."""
    weights = log_sharp.mul_(-sample_weight)
    return weights if code_weight is None else weights.add_(code_weight)


def _row_statistics(tokens: Tensor, codebook: Tensor, temperature: float, chunk_size: int, row_kernels: bool):
    """argmax_k L, m = max_k L, log sum_k exp((L - m) / T), qbar_k = mean_n q_nk and the per-token
    entropies H(q_n) = -sum_k q_nk log q_nk, one block of tokens at a time."""
    n, k = tokens.shape[0], codebook.shape[0]
    indices, max_logit = tokens.new_empty(n, dtype=torch.long), tokens.new_empty(n)
    log_sharp_sum, token_entropy, average = tokens.new_empty(n), tokens.new_empty(n), tokens.new_zeros(k)
    ones = tokens.new_ones(n)
    for start, stop, logits, _, work in _logit_blocks(tokens, codebook, chunk_size, buffers=0 if row_kernels else 1):
        block = slice(start, stop)
        if row_kernels:
            sharp = triton_ibq.block_statistics(logits, max_logit[block], indices[block], log_sharp_sum[block], token_entropy[block],
                                                temperature, EXP_FLOOR)
        else:
            torch.max(logits, 1, out=(max_logit[block], indices[block]))  # ties: the first code, as argmax
            shifted = logits.sub_(max_logit[block, None])
            unnormalised = torch.div(shifted, temperature, out=work[0]).clamp_(min=EXP_FLOOR).exp_()
            torch.log(unnormalised.sum(1), out=log_sharp_sum[block])
            log_sharp = _log_sharp(shifted, log_sharp_sum[block], temperature)
            sharp = torch.exp(log_sharp, out=work[0])
            torch.neg(log_sharp.mul_(sharp).sum(1), out=token_entropy[block])  # sharp is kept
        average.addmv_(sharp.t(), ones[: stop - start])
    return indices, max_logit, log_sharp_sum, average.div_(n), token_entropy


def _value_unless_zero(gradient: Tensor | None) -> float | None:
    return None if gradient is None or float(gradient) == 0.0 else float(gradient)


def _block_gradient(shifted, dots, work, product, log_sharp_sum, temperature, sample_weight, code_weight, scale):
    """dLoss/dL of a block from its shifted logits and gradient dots (None without the straight-through
    path), in place of one of them; `sample_weight` and `code_weight` None where the entropy is unused.

    Both softmax Jacobians are centred on weighted means under the probabilities as computed:
    sum_k p_nk G_n.e_k / sum_k p_nk and sum_k q_nk x_nk / sum_k q_nk with x_nk = w_k - g_s log q_nk.
    Dividing by the sums as computed, not taking them for 1, keeps each row of dLoss/dL summing to zero
    in fp32, and so do the row sums taken with sum() (pairwise, where a GEMV accumulates K terms in
    turn): otherwise the direction all codes share (|L| ~ 70 where T = 0.01 resolves differences of 0.01)
    leaks into the gradient."""
    grad_logits = None
    if dots is not None:  # p_nk (G_n.e_k - centre_n), in place of the dots
        unnormalised = torch.clamp(shifted, min=EXP_FLOOR, out=work).exp_()
        soft_sum = unnormalised.sum(1, keepdim=True)
        soft_centre = torch.mul(dots, unnormalised, out=product).sum(1, keepdim=True).div_(soft_sum)
        grad_logits = dots.sub_(soft_centre).mul_(unnormalised.div_(soft_sum))
    if sample_weight is not None or code_weight is not None:  # q_nk (x_nk - centre_n) / (N T), in place of the logits
        log_sharp = _log_sharp(shifted, log_sharp_sum, temperature)
        sharp = torch.exp(log_sharp, out=work)
        weights = _entropy_weights(log_sharp, code_weight, 0.0 if sample_weight is None else sample_weight)
        sharp_centre = torch.mul(weights, sharp, out=product).sum(1, keepdim=True).div_(sharp.sum(1, keepdim=True))
        centred = weights.sub_(sharp_centre)
        grad_logits = centred.mul_(sharp).mul_(scale) if grad_logits is None else grad_logits.addcmul_(centred, sharp, value=scale)
    return grad_logits


def _logit_gradients(tokens, codebook, temperature, chunk_size, max_logit, log_sharp_sum, grad_z_q, sample_weight, code_weight,
                     grad_codebook, row_kernels):
    """The backward pass through the logits, one block of tokens at a time: returns dLoss/dtokens and adds
    dLoss/dcodebook to `grad_codebook` (when given). `grad_z_q` is the gradient of the straight-through
    z_q, `sample_weight` that of the sample entropy, `code_weight` w_k = dLoss/dqbar_k; None where unused.
    With `row_kernels`, Triton's row kernels compute each block's dLoss/dL (as _block_gradient does)."""
    n = tokens.shape[0]
    grad_tokens = torch.empty_like(tokens)
    # The row kernels take the logits unshifted and need no work matrices.
    blocks = _logit_blocks(tokens, codebook, chunk_size, 0 if row_kernels else 2, None if row_kernels else max_logit, grad_z_q)
    for start, stop, logits, dots, work in blocks:
        if row_kernels:
            grad_logits = triton_ibq.block_gradients(logits, dots, max_logit[start:stop], log_sharp_sum[start:stop], sample_weight,
                                                     code_weight, temperature, n, EXP_FLOOR)
        else:
            grad_logits = _block_gradient(logits, dots, *work, log_sharp_sum[start:stop], temperature, sample_weight, code_weight,
                                          1.0 / (n * temperature))
        torch.mm(grad_logits, codebook, out=grad_tokens[start:stop])
        if grad_codebook is not None:
            grad_codebook.addmm_(grad_logits.t(), tokens[start:stop])
    return grad_tokens


class _ChunkedIBQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: Tensor, codebook: Tensor, temperature: float, chunk_size: int, kernels: str):
        ctx.set_materialize_grads(False)
        row_kernels = use_row_kernels(tokens, kernels)
        fused = not row_kernels and use_triton(tokens, kernels)
        if fused:  # fused kernels on a GPU: no logits in memory at all
            indices, max_logit, log_sharp_sum, token_entropy = triton_ibq.row_statistics(tokens, codebook, temperature)
            average = triton_ibq.code_averages(tokens, codebook, temperature, max_logit, log_sharp_sum)
        else:
            indices, max_logit, log_sharp_sum, average, token_entropy = _row_statistics(tokens, codebook, temperature, chunk_size,
                                                                                       row_kernels)
        sample_entropy = token_entropy.mean()
        codebook_entropy = -(average * (average + ENTROPY_EPS).log()).sum()
        z_q = codebook[indices]
        ctx.save_for_backward(tokens, codebook, indices, max_logit, log_sharp_sum, average)
        ctx.temperature, ctx.chunk_size, ctx.fused, ctx.row_kernels = temperature, chunk_size, fused, row_kernels
        ctx.mark_non_differentiable(indices)
        # z_q (straight-through, gradients through p) and z_hard (selected code only) share a value.
        return z_q, z_q.clone(), indices, sample_entropy, codebook_entropy

    @staticmethod
    def backward(ctx, grad_z_q, grad_z_hard, _grad_indices, grad_sample_entropy, grad_codebook_entropy):
        tokens, codebook, indices, max_logit, log_sharp_sum, average = ctx.saved_tensors
        temperature, chunk_size, fused = ctx.temperature, ctx.chunk_size, ctx.fused
        # The entropies' incoming gradients, None where unused.
        sample_weight, codebook_weight = grad_sample_entropy, grad_codebook_entropy
        if not weights_stay_on_device(tokens, ctx.fused or ctx.row_kernels):
            sample_weight, codebook_weight = _value_unless_zero(sample_weight), _value_unless_zero(codebook_weight)
        soft_path = grad_z_q is not None
        entropy_path = sample_weight is not None or codebook_weight is not None

        grad_codebook = torch.zeros_like(codebook) if ctx.needs_input_grad[1] else None
        selected = [g for g in (grad_z_q, grad_z_hard) if g is not None]
        if grad_codebook is not None and selected:
            # onehot^T G: the forward value of (onehot - sg(p) + p) is the one-hot.
            grad_codebook.index_add_(0, indices, sum(selected))
        if not (soft_path or entropy_path):
            return None, grad_codebook, None, None, None

        # d H(qbar) / d qbar_k times the incoming gradient: the codebook entropy's weight of code k.
        code_weight = None
        if codebook_weight is not None:
            code_weight = -((average + ENTROPY_EPS).log() + average / (average + ENTROPY_EPS)) * codebook_weight

        if fused:  # fused kernels on a GPU: the logits recomputed tile by tile in registers
            grad_tokens = triton_ibq.logit_gradients(tokens, codebook, temperature, max_logit, log_sharp_sum, grad_z_q,
                                                     sample_weight, code_weight, EXP_FLOOR, grad_codebook)
        else:
            grad_tokens = _logit_gradients(tokens, codebook, temperature, chunk_size, max_logit, log_sharp_sum, grad_z_q,
                                           sample_weight, code_weight, grad_codebook, ctx.row_kernels)
        return grad_tokens, grad_codebook, None, None, None


def chunked_ibq(tokens: Tensor, codebook: Tensor, temperature: float, chunk_size: int, kernels: str = "torch"):
    """IBQ on (N, D) tokens with a (K, D) codebook, holding tokens x chunk_size logits at a time,
    computed by `kernels` (KERNELS).

    Returns (z_q, z_hard, indices, sample_entropy, codebook_entropy), equal in value and gradient to
    the dense computation: z_q = (onehot - sg(p) + p) E, z_hard = E[indices], and the MAGVIT-v2 entropy
    terms mean_n H(q_n) and H(mean_n q_n)."""
    return _ChunkedIBQ.apply(tokens, codebook, temperature, chunk_size, kernels)
