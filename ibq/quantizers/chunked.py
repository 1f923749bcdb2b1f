"""Codebook-slice computations, so that no tokens x K matrix is ever held.

`chunked_ibq` is IBQ's assignment and its softmax / entropy terms, forward and backward, with memory
O(N * chunk + K * D): the logits of one codebook slice at a time, streamed through an online
logsumexp, and recomputed in the backward pass instead of being stored. `nearest_code` is the same
idea for the argmin of the VQ family.

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


# How the slices are computed: "torch" runs cuBLAS (or CPU) GEMMs on each slice; "triton" runs the fused
# kernels of ibq.quantizers.triton_ibq where the tokens are on CUDA (the torch slices elsewhere), which
# keep no slice of logits in memory but were measured slower on an H200 (README, "GPU figures").
KERNELS = ("torch", "triton")


def use_triton(tokens: Tensor, kernels: str) -> bool:
    return kernels == "triton" and triton_ibq.available(tokens)


def weights_stay_on_device(tokens: Tensor, fused: bool) -> bool:
    """Whether the backward pass keeps the entropies' incoming gradients as tensors: on a GPU reading one
    would wait for the device, so a zero one costs some arithmetic; on the host a zero one skips its term."""
    return fused or tokens.is_cuda


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


def _logit_slices(tokens: Tensor, codebook: Tensor, chunk_size: int, max_logit: Tensor | None = None, gradient: Tensor | None = None):
    """(start, stop, logits, gradient_dots) for each slice: logits = tokens @ codebook[start:stop].T, minus
    `max_logit` when given, and gradient_dots = gradient @ codebook[start:stop].T when a gradient is given.

    Every pass computes the logits with the same GEMM and subtracts the maximum afterwards, so that the
    code that holds the maximum gets a shifted logit of exactly 0 in every pass. A GEMM that adds the shift
    itself (addmm) rounds differently: at |L| ~ 70 that is ~4e-6, which T = 0.01 turns into a 4e-4 error
    in log q and a biased entropy gradient."""
    n, k = tokens.shape[0], codebook.shape[0]
    buffer = tokens.new_empty(n * min(chunk_size, k))
    gradient_buffer = None if gradient is None else gradient.new_empty(n * min(chunk_size, k))
    for start, stop in codebook_slices(k, chunk_size):
        block = codebook[start:stop].t()
        logits = torch.mm(tokens, block, out=_rows(buffer, n, stop - start))
        if max_logit is not None:
            logits.sub_(max_logit[:, None])
        dots = None if gradient is None else torch.mm(gradient, block, out=_rows(gradient_buffer, n, stop - start))
        yield start, stop, logits, dots


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum_k a_nk b_nk in one pass (a batched GEMV)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _log_sharp(shifted: Tensor, log_sharp_sum: Tensor, temperature: float) -> Tensor:
    """log q = (L - m) / T - log sum exp((L - m) / T), in place of `shifted`: the large logits cancel
    before the division."""
    return torch.add(-log_sharp_sum[:, None], shifted, alpha=1 / temperature, out=shifted).clamp_(min=EXP_FLOOR)


def _entropy_weights(log_sharp: Tensor, code_weight: Tensor | None, sample_weight: float) -> Tensor:
    """w_k - g_s log q_nk in place of `log_sharp`: what q_nk multiplies in the entropy terms' dLoss/dL,
    up to a constant per row (which the softmax Jacobian removes)."""
    weights = log_sharp.mul_(-sample_weight)
    return weights if code_weight is None else weights.add_(code_weight)


def _argmax_and_sharp_normaliser(tokens: Tensor, codebook: Tensor, temperature: float, chunk_size: int):
    """First pass: argmax_k L, m = max_k L and log sum_k exp((L - m) / T), the sum kept online
    (rescaled whenever a later slice raises the maximum)."""
    n = tokens.shape[0]
    ones = tokens.new_ones(min(chunk_size, codebook.shape[0]))
    for start, stop, logits, _ in _logit_slices(tokens, codebook, chunk_size):
        chunk_max, chunk_index = logits.max(1)
        if start == 0:
            max_logit, indices, sharp_sum = chunk_max, chunk_index, tokens.new_zeros(n)
        else:
            # Strictly greater: ties keep the earlier code, as argmax over all K does.
            indices = torch.where(chunk_max > max_logit, chunk_index + start, indices)
            new_max = torch.maximum(max_logit, chunk_max)
            sharp_sum.mul_(((max_logit - new_max) / temperature).exp())
            max_logit = new_max
        sharp = logits.sub_(max_logit[:, None]).div_(temperature).clamp_(min=EXP_FLOOR).exp_()
        sharp_sum.add_(torch.mv(sharp, ones[: stop - start]))
    return indices, max_logit, sharp_sum.log()


def _sharp_statistics(tokens, codebook, temperature, chunk_size, max_logit, log_sharp_sum):
    """Second pass: qbar_k = mean_n q_nk and the per-token entropies H(q_n) = -sum_k q_nk log q_nk."""
    n, k = tokens.shape[0], codebook.shape[0]
    average, token_entropy = tokens.new_empty(k), tokens.new_zeros(n)
    ones = tokens.new_ones(n)
    work_buffer = tokens.new_empty(n * min(chunk_size, k))
    for start, stop, shifted, _ in _logit_slices(tokens, codebook, chunk_size, max_logit):
        log_sharp = _log_sharp(shifted, log_sharp_sum, temperature)
        sharp = torch.exp(log_sharp, out=_rows(work_buffer, n, stop - start))
        torch.mv(sharp.t(), ones, out=average[start:stop])
        token_entropy.sub_(_row_dot(sharp, log_sharp))
    return average.div_(n), token_entropy


def _value_unless_zero(gradient: Tensor | None) -> float | None:
    return None if gradient is None or float(gradient) == 0.0 else float(gradient)


def _logit_gradients(tokens, codebook, temperature, chunk_size, max_logit, log_sharp_sum, grad_z_q, sample_weight, code_weight,
                     grad_codebook):
    """The backward pass through the logits, slice by slice: returns dLoss/dtokens and adds dLoss/dcodebook
    to `grad_codebook` (when given). `grad_z_q` is the gradient of the straight-through z_q, `sample_weight`
    that of the sample entropy, `code_weight` w_k = dLoss/dqbar_k; None where unused."""
    n, k = tokens.shape[0], codebook.shape[0]
    soft_path, entropy_path = grad_z_q is not None, sample_weight is not None or code_weight is not None
    sample_weight = 0.0 if sample_weight is None else sample_weight
    # Each slice gives L - m and, on the straight-through path, G . e_k for the gradient G of z_q.
    work_buffer = tokens.new_empty(n * min(chunk_size, k))

    # Pass 1: the centres of both softmax Jacobians, as weighted means under the probabilities this
    # pass computes: sum_k p_nk G_n.e_k / sum_k p_nk and sum_k q_nk x_nk / sum_k q_nk with
    # x_nk = w_k - g_s log q_nk. Dividing by the sums as computed, not taking them for 1,
    # keeps each row of dLoss/dL summing to zero in fp32, and so do the row sums taken with sum()
    # (pairwise, where mv and bmm accumulate K terms in turn): otherwise the direction all codes share
    # (|L| ~ 70 where T = 0.01 resolves differences of 0.01) leaks into the gradient.
    soft_sum, soft_dot = tokens.new_zeros(n), tokens.new_zeros(n)
    sharp_sum, sharp_dot = tokens.new_zeros(n), tokens.new_zeros(n)
    for start, stop, shifted, dots in _logit_slices(tokens, codebook, chunk_size, max_logit, grad_z_q):
        work = _rows(work_buffer, n, stop - start)
        if soft_path:
            unnormalised = torch.clamp(shifted, min=EXP_FLOOR, out=work).exp_()
            soft_sum.add_(unnormalised.sum(1))
            soft_dot.add_(dots.mul_(unnormalised).sum(1))
        if entropy_path:
            log_sharp = _log_sharp(shifted, log_sharp_sum, temperature)
            sharp = torch.exp(log_sharp, out=work)
            sharp_sum.add_(sharp.sum(1))
            code_slice = None if code_weight is None else code_weight[start:stop]
            sharp_dot.add_(_entropy_weights(log_sharp, code_slice, sample_weight).mul_(sharp).sum(1))
    log_soft_sum, soft_centre = soft_sum.log(), soft_dot / soft_sum

    # Pass 2: dLoss/dL of the slice, then its products with the codebook and with the tokens.
    # Entropy part: q_nk (x_nk - centre_n) / (N T).
    scale = 1.0 / (n * temperature)
    sharp_centre = (sharp_dot / sharp_sum * scale)[:, None] if entropy_path else None
    code_term = None if code_weight is None else code_weight * scale
    grad_tokens = torch.zeros_like(tokens)
    for start, stop, shifted, dots in _logit_slices(tokens, codebook, chunk_size, max_logit, grad_z_q):
        work = _rows(work_buffer, n, stop - start)
        grad_logits = None
        if soft_path:
            probs = torch.sub(shifted, log_soft_sum[:, None], out=work).clamp_(min=EXP_FLOOR).exp_()
            grad_logits = dots.sub_(soft_centre[:, None]).mul_(probs)
        if entropy_path:
            log_sharp = _log_sharp(shifted, log_sharp_sum, temperature)
            sharp = torch.exp(log_sharp, out=work)
            code_slice = None if code_term is None else code_term[start:stop]
            term = _entropy_weights(log_sharp, code_slice, sample_weight * scale).sub_(sharp_centre)
            grad_logits = sharp.mul_(term) if grad_logits is None else grad_logits.addcmul_(sharp, term)
        grad_tokens.addmm_(grad_logits, codebook[start:stop])
        if grad_codebook is not None:
            grad_codebook[start:stop].addmm_(grad_logits.t(), tokens)
    return grad_tokens


class _ChunkedIBQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: Tensor, codebook: Tensor, temperature: float, chunk_size: int, kernels: str):
        ctx.set_materialize_grads(False)
        fused = use_triton(tokens, kernels)
        if fused:  # fused kernels on a GPU: no logits in memory at all
            indices, max_logit, log_sharp_sum, token_entropy = triton_ibq.row_statistics(tokens, codebook, temperature)
            average = triton_ibq.code_averages(tokens, codebook, temperature, max_logit, log_sharp_sum)
        else:
            indices, max_logit, log_sharp_sum = _argmax_and_sharp_normaliser(tokens, codebook, temperature, chunk_size)
            average, token_entropy = _sharp_statistics(tokens, codebook, temperature, chunk_size, max_logit, log_sharp_sum)
        sample_entropy = token_entropy.mean()
        codebook_entropy = -(average * (average + ENTROPY_EPS).log()).sum()
        z_q = codebook[indices]
        ctx.save_for_backward(tokens, codebook, indices, max_logit, log_sharp_sum, average)
        ctx.temperature, ctx.chunk_size, ctx.fused = temperature, chunk_size, fused
        ctx.mark_non_differentiable(indices)
        # z_q (straight-through, gradients through p) and z_hard (selected code only) share a value.
        return z_q, z_q.clone(), indices, sample_entropy, codebook_entropy

    @staticmethod
    def backward(ctx, grad_z_q, grad_z_hard, _grad_indices, grad_sample_entropy, grad_codebook_entropy):
        tokens, codebook, indices, max_logit, log_sharp_sum, average = ctx.saved_tensors
        temperature, chunk_size, fused = ctx.temperature, ctx.chunk_size, ctx.fused
        # The entropies' incoming gradients, None where unused.
        sample_weight, codebook_weight = grad_sample_entropy, grad_codebook_entropy
        if not weights_stay_on_device(tokens, fused):
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
                                           sample_weight, code_weight, grad_codebook)
        return grad_tokens, grad_codebook, None, None, None


def chunked_ibq(tokens: Tensor, codebook: Tensor, temperature: float, chunk_size: int, kernels: str = "torch"):
    """IBQ on (N, D) tokens with a (K, D) codebook, `chunk_size` codes at a time, computed by `kernels`
    (KERNELS).

    Returns (z_q, z_hard, indices, sample_entropy, codebook_entropy), equal in value and gradient to
    the dense computation: z_q = (onehot - sg(p) + p) E, z_hard = E[indices], and the MAGVIT-v2 entropy
    terms mean_n H(q_n) and H(mean_n q_n)."""
    return _ChunkedIBQ.apply(tokens, codebook, temperature, chunk_size, kernels)
