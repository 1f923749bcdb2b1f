"""IBQ against an independent transcription of its formula, and the chunked path against the dense one."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ibq.errors import UserError
from ibq.quantizers import IBQ, triton_ibq
from ibq.quantizers.chunked import chunked_ibq

K, D = 64, 8
WEIGHTS = dict(
    double_quant_weight=1.0,
    commitment_weight=1.0,
    codebook_weight=0.25,
    entropy_weight=0.3,
    entropy_temperature=0.05,
    sample_entropy_weight=1.0,
    codebook_entropy_weight=0.7,
)


# Set in the process test_triton_kernels_under_the_interpreter starts: there chunked IBQ runs the Triton
# kernels, on CPU tensors, under Triton's interpreter.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def triton_kernels_when_interpreted(monkeypatch: pytest.MonkeyPatch):
    if INTERPRETED:
        from ibq.quantizers import chunked

        monkeypatch.setattr(chunked, "use_triton", lambda tokens, kernels: kernels != "triton_rows")
        monkeypatch.setattr(chunked, "use_row_kernels", lambda tokens, kernels: kernels == "triton_rows")


def reference_ibq(z, codebook, *, double_quant_weight, commitment_weight, codebook_weight, entropy_weight,
                  entropy_temperature, sample_entropy_weight, codebook_entropy_weight):
    """The released IBQ quantizer written out with plain torch ops (SEED-Voken's IndexPropagationQuantize)."""
    tokens = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    logits = torch.einsum("nd,kd->nk", tokens, codebook)
    probs = torch.softmax(logits, dim=1)
    indices = torch.argmax(logits, dim=1)
    hard = torch.zeros_like(probs).scatter_(1, indices[:, None], 1.0)
    z_q = (hard - probs.detach() + probs) @ codebook
    selected = codebook[indices]
    quant = (
        double_quant_weight * ((z_q - tokens) ** 2).mean()
        + commitment_weight * ((selected.detach() - tokens) ** 2).mean()
        + codebook_weight * ((selected - tokens.detach()) ** 2).mean()
    )
    sharp_log = torch.log_softmax(logits / entropy_temperature, dim=1)
    sharp = sharp_log.exp()
    sample_entropy = (-(sharp * sharp_log).sum(1)).mean()
    average = sharp.mean(0)
    codebook_entropy = -(average * torch.log(average + 1e-5)).sum()
    loss = quant + entropy_weight * (sample_entropy_weight * sample_entropy - codebook_entropy_weight * codebook_entropy)
    b, _, h, w = z.shape
    return z_q.reshape(b, h, w, -1).permute(0, 3, 1, 2), indices.reshape(b, h, w), loss


def assert_gradients_close(actual, expected):
    """fp32 tolerance for sums over many codes: relative to the gradient's largest entry."""
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-4, atol=2e-5 * float(expected.abs().max()))


def run(quantizer, z, upstream):
    """Quantize, backpropagate a decoder-like gradient plus the loss; return outputs and gradients."""
    z = z.clone().requires_grad_()
    quantizer.zero_grad(set_to_none=True)
    out = quantizer(z)
    ((out.z_q * upstream).sum() + out.loss).backward()
    return out, z.grad, quantizer.codebook.weight.grad


def inputs(seed: int, scale: float = 1.0, shape=(2, D, 3, 5)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * scale, torch.randn(shape, generator=generator)


@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0])
def test_dense_ibq_matches_the_formula_written_out(scale):
    torch.manual_seed(0)
    quantizer = IBQ(K, D, **WEIGHTS)
    z, upstream = inputs(1, scale)
    out, grad_z, grad_codebook = run(quantizer, z, upstream)

    codebook = quantizer.codebook.weight.detach().double().requires_grad_()
    z_ref = z.double().requires_grad_()
    z_q, indices, loss = reference_ibq(z_ref, codebook, **WEIGHTS)
    ((z_q * upstream.double()).sum() + loss).backward()

    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(out.z_q.double(), z_q.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), loss.detach(), rtol=1e-5, atol=1e-6)
    assert_gradients_close(grad_z.double(), z_ref.grad)
    assert_gradients_close(grad_codebook.double(), codebook.grad)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64, 100])
@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0])
def test_chunked_equals_dense(chunk_size, scale):
    torch.manual_seed(0)
    dense = IBQ(K, D, **WEIGHTS)
    chunked = IBQ(K, D, **WEIGHTS, chunk_size=chunk_size)
    chunked.load_state_dict(dense.state_dict())
    z, upstream = inputs(2, scale)
    out_dense, grad_z_dense, grad_codebook_dense = run(dense, z, upstream)
    out_chunked, grad_z_chunked, grad_codebook_chunked = run(chunked, z, upstream)

    assert torch.equal(out_chunked.indices, out_dense.indices)
    torch.testing.assert_close(out_chunked.z_q, out_dense.z_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_chunked.loss, out_dense.loss, rtol=1e-5, atol=1e-6)
    assert out_chunked.stats.keys() == out_dense.stats.keys()
    for key, value in out_dense.stats.items():
        assert float(out_chunked.stats[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
    assert_gradients_close(grad_z_chunked, grad_z_dense)
    assert_gradients_close(grad_codebook_chunked, grad_codebook_dense)


def assert_chunked_equals_dense_at_paper_beta(codebook_size: int, dim: int, shape: tuple, chunk_size: int, device: str = "cpu",
                                              chunk_kernels: str = "torch"):
    """Same indices, statistics, loss and gradients as dense IBQ, with the paper's beta and temperature."""
    weights = dict(WEIGHTS, commitment_weight=0.25, codebook_weight=1.0, entropy_temperature=0.01, entropy_weight=0.05)
    torch.manual_seed(3)
    dense = IBQ(codebook_size, dim, **weights).to(device)
    chunked = IBQ(codebook_size, dim, **weights, chunk_size=chunk_size, chunk_kernels=chunk_kernels).to(device)
    chunked.load_state_dict(dense.state_dict())
    z, upstream = (t.to(device) for t in inputs(4, 0.5, shape=shape))
    out_dense, grad_z_dense, grad_codebook_dense = run(dense, z, upstream)
    out_chunked, grad_z_chunked, grad_codebook_chunked = run(chunked, z, upstream)
    assert torch.equal(out_chunked.indices, out_dense.indices)
    for key, value in out_dense.stats.items():
        assert float(out_chunked.stats[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(out_chunked.loss, out_dense.loss, rtol=1e-5, atol=1e-6)
    assert_gradients_close(grad_z_chunked, grad_z_dense)
    assert_gradients_close(grad_codebook_chunked, grad_codebook_dense)


def test_chunked_equals_dense_with_paper_beta_and_more_tokens():
    assert_chunked_equals_dense_at_paper_beta(1000, 32, (4, 32, 8, 8), chunk_size=96)


@pytest.mark.parametrize("chunk_kernels", ["torch", "triton_rows"])  # the same off CUDA, except under the interpreter
@pytest.mark.parametrize("used", ["z_q only", "loss only", "entropy off"])
def test_chunked_gradients_when_only_some_outputs_are_used(used, chunk_kernels):
    weights = dict(WEIGHTS, entropy_weight=0.0) if used == "entropy off" else WEIGHTS
    torch.manual_seed(0)
    dense = IBQ(K, D, **weights)
    chunked = IBQ(K, D, **weights, chunk_size=10, chunk_kernels=chunk_kernels)
    chunked.load_state_dict(dense.state_dict())
    z, upstream = inputs(5)
    grads = []
    for quantizer in (dense, chunked):
        z_leaf = z.clone().requires_grad_()
        out = quantizer(z_leaf)
        objective = {"z_q only": (out.z_q * upstream).sum(), "loss only": out.loss}.get(used, (out.z_q * upstream).sum() + out.loss)
        objective.backward()
        grads.append((z_leaf.grad, quantizer.codebook.weight.grad))
    assert_gradients_close(grads[1][0], grads[0][0])
    assert_gradients_close(grads[1][1], grads[0][1])


@pytest.mark.parametrize("chunk_kernels", ["torch", "triton_rows"])
@pytest.mark.parametrize("codes", [(3, 140), (2, 2050), (60, 2100), (5, 4100)])
def test_equal_codes_give_the_first_index(codes, chunk_kernels):
    """The largest code twice (under the interpreter: in different code ranges of the fused kernels, and
    for the row kernels, whose tiles of 2048 codes the interpreter cuts into two ranges of 4096, in one
    lane, in two lanes of a range, or in two ranges): every token next to it takes the first, as argmax
    over all K does."""
    quantizer = IBQ(4500, D, chunk_size=64, chunk_kernels=chunk_kernels)
    with torch.no_grad():
        quantizer.codebook.weight[list(codes)] = 10.0
        out = quantizer(torch.ones(1, D, 2, 2))
    assert out.indices.flatten().tolist() == [codes[0]] * 4


def test_chunked_function_passes_gradcheck_in_float64():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(9, 4, generator=generator, dtype=torch.float64, requires_grad=True)

    # z_q's gradient is a straight-through surrogate (its value does not move with z), so finite
    # differences apply to the entropies and to the selected codes only; z_q is checked against dense.
    def differentiable_outputs(tokens, codebook):
        _, z_hard, _, sample_entropy, codebook_entropy = chunked_ibq(tokens, codebook, 0.5, 4)
        return z_hard, sample_entropy, codebook_entropy

    assert torch.autograd.gradcheck(differentiable_outputs, (tokens, codebook))


def test_chunked_keeps_no_tokens_by_codes_tensor_for_backward():
    n, k = 60, 500
    saved_sizes = []
    quantizer = IBQ(k, D, chunk_size=32)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_sizes.append(t.numel()) or t, lambda t: t):
        out = quantizer(torch.randn(3, D, 4, 5, requires_grad=True))
    out.loss.backward()
    assert out.indices.numel() == n
    assert max(saved_sizes) == k * D < n * k  # the codebook itself is the largest saved tensor


class LargestTensor(torch.overrides.TorchFunctionMode):
    """The most values any torch call returns while the mode is on."""

    largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_chunked_holds_a_few_tokens_by_chunk_matrices_at_most():
    """Forward and backward create nothing larger than four tokens x chunk_size buffers (the logits,
    their gradient products and two work matrices, stored together), or twice the codebook where blocks
    are at their smallest (D / 2 tokens)."""
    n, k = 60, 500
    for chunk in (64, 8):
        quantizer = IBQ(k, D, **WEIGHTS, chunk_size=chunk)
        z, upstream = inputs(8, shape=(3, D, 4, 5))
        with LargestTensor() as mode:
            run(quantizer, z, upstream)
        assert mode.largest <= max(4 * n * chunk, 2 * k * D) < n * k


def test_chunked_runs_without_autograd():
    quantizer = IBQ(K, D, chunk_size=16)
    dense = IBQ(K, D)
    dense.load_state_dict(quantizer.state_dict())
    z, _ = inputs(6)
    with torch.no_grad():
        out, out_dense = quantizer(z), dense(z)
    assert torch.equal(out.indices, out_dense.indices)
    torch.testing.assert_close(out.loss, out_dense.loss, rtol=1e-5, atol=1e-6)


def assert_as_accurate_as_dense_near_a_shared_direction(side: int, k: int, dim: int, chunk_size: int, device: str = "cpu",
                                                        chunk_kernels: str = "torch"):
    """T = 0.01, codes near a shared direction (|L| ~ 70, logits a few T apart, as in a trained codebook):
    the chunked fp32 gradient is within 2x the dense fp32 gradient's distance from an fp64 evaluation of
    the formula."""
    weights = dict(WEIGHTS, commitment_weight=0.25, codebook_weight=1.0, entropy_weight=0.05, entropy_temperature=0.01,
                   codebook_entropy_weight=1.0)
    generator = torch.Generator().manual_seed(0)
    shared = torch.full((dim,), (70 / dim) ** 0.5)
    tokens = shared + 0.1 * torch.randn(side * side, dim, generator=generator)
    z = tokens.t().reshape(1, dim, side, side).contiguous()
    upstream = torch.randn(z.shape, generator=generator)
    codebook = shared + 0.005 * torch.randn(k, dim, generator=generator)

    z64, codebook64 = z.double().requires_grad_(), codebook.double().requires_grad_()
    z_q, _, loss = reference_ibq(z64, codebook64, **weights)
    ((z_q * upstream.double()).sum() + loss).backward()

    def relative_error(chunk_size):
        kernels = {} if chunk_size is None else {"chunk_kernels": chunk_kernels}
        quantizer = IBQ(k, dim, **weights, chunk_size=chunk_size, **kernels).to(device)
        quantizer.codebook.weight.data.copy_(codebook)
        _, grad_z, grad_codebook = run(quantizer, z.to(device), upstream.to(device))
        return [float((grad.cpu().double() - exact).norm() / exact.norm())
                for grad, exact in ((grad_z, z64.grad), (grad_codebook, codebook64.grad))]

    dense, chunked = relative_error(None), relative_error(chunk_size)
    assert chunked[0] <= 2 * dense[0] and chunked[1] <= 2 * dense[1], (chunked, dense)


def test_chunked_gradient_is_as_accurate_as_dense_at_the_released_settings():
    """D = 256, K = 16384, the 256 tokens in two blocks."""
    assert_as_accurate_as_dense_near_a_shared_direction(16, 16384, 256, chunk_size=8192)


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 from the start: test_triton_kernels_under_the_interpreter runs it so")
def test_triton_kernels_equal_dense():
    """The fused kernels of chunked IBQ (ibq.quantizers.triton_ibq), forward and backward, run by Triton's
    interpreter on CPU: same indices, loss and gradients as the dense path, and gradients as close to an
    fp64 evaluation as the dense path's. Uneven N, K and D exercise the tiles' masks."""
    # 72 and 81 tokens: two row tiles, the second partial; 150 and 100 codes, 40 and 48 dimensions: partial
    # tiles too, and the codes shared out over two ranges
    assert_chunked_equals_dense_at_paper_beta(150, 40, (2, 40, 6, 6), chunk_size=96)
    assert_as_accurate_as_dense_near_a_shared_direction(9, 100, 48, chunk_size=96)


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 from the start: test_triton_kernels_under_the_interpreter runs it so")
def test_triton_row_kernels_equal_dense():
    """The row kernels around the GEMMs (chunk_kernels=triton_rows), forward and backward, under the
    interpreter: as the fused kernels above. 3000 and 2500 codes: a second, partial tile of codes; 72
    tokens in blocks of 20 (D / 2), the last partial."""
    assert_chunked_equals_dense_at_paper_beta(3000, 40, (2, 40, 6, 6), chunk_size=96, chunk_kernels="triton_rows")
    assert_as_accurate_as_dense_near_a_shared_direction(9, 2500, 48, chunk_size=96, chunk_kernels="triton_rows")


@pytest.mark.skipif(INTERPRETED, reason="this is the process it starts")
def test_triton_kernels_under_the_interpreter():
    """Triton decides at import whether kernels are compiled or interpreted: a fresh process it is. It also
    runs the gradient tests of partly used outputs, which turn the backward kernels' paths on and off, and
    the tests of equal codes, for the fused kernels and the row kernels."""
    pytest.importorskip("triton", reason="Triton is not installed: CPU-only builds of torch come without it")
    # The backward kernels recompute the logits and need the forward's bits, which a GPU gives (one FMA chain over
    # D per logit, whatever the tile). The interpreter's tl.dot is numpy's matmul: OpenBLAS's FMA kernels (Haswell,
    # Zen, ...) sum an element in an order that depends on the matrix's shape, so tiles of other shapes round a
    # logit differently; its kernels without FMA (Prescott: any x86-64) sum each element in one order.
    blas = {"OPENBLAS_CORETYPE": "Prescott"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k",
         "test_triton_kernels_equal_dense or test_triton_row_kernels_equal_dense or test_chunked_gradients_when_only_some_outputs_are_used"
         " or test_equal_codes_give_the_first_index"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", **blas},
    )
    assert result.returncode == 0 and "16 passed" in result.stdout, result.stdout[-3000:]


@pytest.mark.skipif(triton_ibq.triton is None, reason="Triton is not installed: CPU-only builds of torch come without it")
def test_triton_kernels_serve_only_gpus_triton_compiles_for(gpu_reported):
    """Elsewhere chunk_kernels=triton and triton_rows compute with torch, as off CUDA."""
    tokens_on_the_gpu = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))  # what available() reads of them
    gpu_reported((9, 0))
    assert triton_ibq.available(tokens_on_the_gpu) and not triton_ibq.available(torch.zeros(1))
    gpu_reported((6, 0), "Tesla P100-PCIE-16GB")
    assert not triton_ibq.available(tokens_on_the_gpu)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("chunk_kernels", ["torch", "triton_rows", "triton"])
def test_chunked_ibq_on_cuda_equals_dense_and_never_waits(chunk_kernels):
    if chunk_kernels != "torch":
        pytest.importorskip("triton", reason="Triton is not installed")
    assert_chunked_equals_dense_at_paper_beta(3000, 64, (4, 64, 8, 8), chunk_size=512, device="cuda", chunk_kernels=chunk_kernels)
    assert_as_accurate_as_dense_near_a_shared_direction(16, 16384, 256, chunk_size=8192, device="cuda", chunk_kernels=chunk_kernels)
    quantizer = IBQ(3000, 64, **WEIGHTS, chunk_size=512, chunk_kernels=chunk_kernels).cuda()
    z, upstream = (t.cuda() for t in inputs(7, shape=(4, 64, 8, 8)))
    run(quantizer, z, upstream)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # forward and backward never wait for the GPU
    try:
        run(quantizer, z, upstream)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("used", ["z_q only", "loss only", "entropy off"])
def test_torch_blocks_equal_dense_with_the_entropy_weights_kept_on_the_device(monkeypatch, used):
    """The torch blocks' backward as it runs on CUDA, where the entropies' incoming gradients stay tensors
    (zero ones included), checked here on CPU."""
    from ibq.quantizers import chunked

    monkeypatch.setattr(chunked, "weights_stay_on_device", lambda tokens, triton: True)
    test_chunked_gradients_when_only_some_outputs_are_used(used, "torch")
    assert_chunked_equals_dense_at_paper_beta(1000, 32, (4, 32, 8, 8), chunk_size=96)


def test_chunk_kernels_are_checked_and_triton_is_the_torch_path_off_cuda():
    with pytest.raises(UserError, match=r"quantizer.chunk_kernels='cuda' is invalid; valid: torch, triton"):
        IBQ(K, D, chunk_size=16, chunk_kernels="cuda")
    torch.manual_seed(0)
    plain = IBQ(K, D, **WEIGHTS, chunk_size=16)
    asked = IBQ(K, D, **WEIGHTS, chunk_size=16, chunk_kernels="triton")
    asked.load_state_dict(plain.state_dict())
    z, upstream = inputs(8)
    for expected, actual in zip(run(plain, z, upstream)[1:], run(asked, z, upstream)[1:]):
        assert torch.equal(actual, expected)



def test_triton_kernels_compile_for_hopper_without_spilling():
    """Every kernel, with all its paths on, compiles for sm_90 with Triton's own compiler and ptxas (no
    GPU needed), and spills no registers at D = 256: spills would put local-memory traffic in every
    tile's inner loop. The interpreter the other tests use checks neither. benchmarks.bench_kernels
    reports it, with the FMAs' share of each tile loop."""
    pytest.importorskip("triton", reason="Triton is not installed: CPU-only builds of torch come without it")
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_kernels"], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    header, *lines = result.stdout.splitlines()
    if "skipped" in header:
        pytest.skip(header)
    figures = dict(line.split(": ", 1) for line in lines)
    kernels = ("row_statistics", "code_average", "row_sums", "token_gradient", "codebook_gradient", "block_max", "block_sharp",
               "block_sums", "block_gradient")
    assert {kernel: int(figures[f"{kernel}_spill_bytes"]) for kernel in kernels} == dict.fromkeys(kernels, 0), result.stdout
    assert 0 < float(figures["ibq_fused_ffma_share"]) < 1
    # triton_ibq.code_splits counts one program per multiprocessor: two would fit at 128 registers or fewer
    over_token_tiles = ("row_statistics", "row_sums", "token_gradient")
    assert all(int(figures[f"{kernel}_registers"]) > 128 for kernel in over_token_tiles), result.stdout


@pytest.mark.parametrize("multiprocessors", [132, 114, 108])  # H200 and H100 SXM, H100 PCIe, A100
def test_code_splits_keep_the_gpu_busy(multiprocessors: int):
    """At the paper's N = 4096 tokens and K = 2^18 codes, each kernel over token tiles cuts its codes into
    ranges so that its programs fill at least 95 % of the multiprocessors over the waves they take."""
    pytest.importorskip("triton", reason="Triton is not installed: CPU-only builds of torch come without it")
    from ibq.quantizers import triton_ibq

    for tiles in (triton_ibq.ROW_STATISTICS_TILES, triton_ibq.ROW_SUMS_TILES, triton_ibq.TOKEN_GRADIENT_TILES):
        row_tiles, code_tiles = 4096 // tiles["BLOCK_N"], 2**18 // tiles["BLOCK_K"]
        splits = triton_ibq.code_splits(row_tiles, code_tiles, multiprocessors)
        waves = -(-row_tiles * splits // multiprocessors)
        assert row_tiles * splits / (waves * multiprocessors) >= 0.95, (tiles, splits, waves)
