"""The quantizer contract, per quantizer, and the properties specific to each."""

import inspect
import math

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import cpu_threads
from ibq.config import CONF_DIR  # also registers the resolvers the primary configs use
from ibq.errors import UserError
from ibq.quantizers import EMAVQ, FSQ, IBQ, L2VQ, LFQ, VQ, SimVQ
from ibq.quantizers.fsq import DEFAULT_LEVELS

K, D = 64, 8

# name -> (factory, parameters that must receive a gradient)
QUANTIZERS = {
    "ibq": (lambda dim: IBQ(K, dim), ["codebook.weight"]),
    "ibq_chunked": (lambda dim: IBQ(K, dim, chunk_size=24), ["codebook.weight"]),
    "vq": (lambda dim: VQ(K, dim), ["codebook.weight"]),
    "vq_legacy": (lambda dim: VQ(K, dim, legacy=True), ["codebook.weight"]),
    "ema_vq": (lambda dim: EMAVQ(K, dim), []),
    "l2_vq": (lambda dim: L2VQ(K, dim, codebook_dim=4), ["codebook.weight", "project_in.weight", "project_out.weight"]),
    "l2_vq_full_dim": (lambda dim: L2VQ(K, dim, codebook_dim=None), ["codebook.weight"]),
    "lfq": (lambda dim: LFQ(K, dim), ["project_in.weight", "project_out.weight"]),
    "lfq_no_projection": (lambda dim: LFQ(K, 6), []),
    "fsq": (lambda dim: FSQ(K, dim, levels=[4, 4, 4]), ["project_in.weight", "project_out.weight"]),
    "fsq_no_projection": (lambda dim: FSQ(60, 3, levels=[5, 4, 3]), []),
    "simvq": (lambda dim: SimVQ(K, dim), ["codebook_map.weight", "codebook_map.bias"]),
}
CONFIG_NAMES = sorted(path.stem for path in (CONF_DIR / "quantizer").glob("*.yaml"))


def build(name: str, seed: int = 0, dim: int = D):
    """`dim`: the encoder's channels, where the quantizer projects them or its codes have that size."""
    torch.manual_seed(seed)
    return QUANTIZERS[name][0](dim)


def encoder_output(quantizer, seed: int = 1, shape=(2, 3, 5)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    b, h, w = shape
    return torch.randn(b, quantizer.dim, h, w, generator=generator)


def train_step(quantizer, z):
    """Forward in training mode, then backward of a decoder-like gradient on z_q plus the loss."""
    quantizer.train()
    z = z.clone().requires_grad_()
    out = quantizer(z)
    upstream = torch.randn(out.z_q.shape, generator=torch.Generator().manual_seed(2))
    ((out.z_q * upstream).sum() + out.loss).backward()
    return out, z.grad


@pytest.mark.parametrize("name", QUANTIZERS)
def test_output_honours_the_contract(name):
    quantizer = build(name)
    z = encoder_output(quantizer)
    out = quantizer(z)
    assert out.z_q.shape == z.shape and out.z_q.dtype == z.dtype
    assert out.indices.shape == (2, 3, 5) and out.indices.dtype == torch.int64
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < quantizer.codebook_size
    assert out.loss.shape == () and torch.isfinite(out.loss)
    # detached 0-d device tensors: the engine reads them on the host only at log steps
    assert out.stats and all(
        isinstance(value, torch.Tensor) and value.shape == () and not value.requires_grad and math.isfinite(value)
        for value in out.stats.values()
    )


@pytest.mark.parametrize("name", QUANTIZERS)
def test_decode_indices_gives_z_q(name):
    quantizer = build(name).eval()
    out = quantizer(encoder_output(quantizer))
    torch.testing.assert_close(quantizer.decode_indices(out.indices), out.z_q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", QUANTIZERS)
def test_gradients_reach_the_encoder_and_the_learned_codebook(name):
    quantizer = build(name)
    out, grad_z = train_step(quantizer, encoder_output(quantizer))
    assert torch.isfinite(out.loss)
    assert grad_z is not None and torch.isfinite(grad_z).all() and grad_z.abs().sum() > 0
    parameters = dict(quantizer.named_parameters())
    for parameter_name in QUANTIZERS[name][1]:
        grad = parameters[parameter_name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, parameter_name


def test_ema_vq_codebook_moves_by_its_moving_average_not_by_gradients():
    quantizer = build("ema_vq")
    before = quantizer.codebook.clone()
    assert not any("codebook" in name for name, _ in quantizer.named_parameters())
    train_step(quantizer, encoder_output(quantizer))
    assert not torch.equal(quantizer.codebook, before)


@pytest.mark.parametrize("name", QUANTIZERS)
def test_a_fixed_seed_gives_the_same_result_twice(name):
    results = []
    for _ in range(2):
        quantizer = build(name, seed=5)
        out, grad_z = train_step(quantizer, encoder_output(quantizer, seed=6))
        results.append((out.z_q.detach(), out.indices, out.loss.detach(), grad_z))
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("name", QUANTIZERS)
def test_every_gradient_is_the_same_bits_at_every_call_on_several_threads(name):
    """Two runs of one command train alike only if each step does: a sum whose order follows the CPU's
    threads (indexing's backward did, for the codebook) changes last bits from call to call, and the runs drift."""
    with cpu_threads(2):
        quantizer = build(name, dim=64)
        z = encoder_output(quantizer, shape=(8, 16, 16))  # 2048 tokens x 64 channels: work for both threads
        calls = []
        for _ in range(8):
            if name == "ema_vq":
                quantizer = build(name, dim=64)  # its codebook moves at every training call
            quantizer.zero_grad(set_to_none=True)
            _, grad_z = train_step(quantizer, z)
            calls.append([grad_z] + [p.grad.clone() for p in quantizer.parameters() if p.grad is not None])
    for call in calls[1:]:
        assert all(torch.equal(a, b) for a, b in zip(calls[0], call, strict=True))


@pytest.mark.parametrize("name", QUANTIZERS)
def test_a_code_dimension_that_does_not_match_the_encoder_is_a_user_error(name):
    quantizer = build(name)
    with pytest.raises(UserError, match=r"quantizer\.dim"):
        quantizer(torch.randn(2, quantizer.dim + 1, 3, 3))


# -- configs ----------------------------------------------------------------------------------------


def test_every_quantizer_has_a_config():
    assert {"ibq", "vq", "ema_vq", "l2_vq", "lfq", "fsq", "simvq"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("config_name", CONFIG_NAMES)
def test_config_lists_every_constructor_argument_with_its_default(config_name):
    config = yaml.safe_load((CONF_DIR / "quantizer" / f"{config_name}.yaml").read_text())
    module_name, class_name = config.pop("_target_").rsplit(".", 1)
    parameters = inspect.signature(getattr(__import__(module_name, fromlist=[class_name]), class_name)).parameters
    assert config.keys() == parameters.keys()
    assert config.pop("codebook_size") == "${codebook_size}" and config.pop("dim") == "${model.embed_dim}"
    for key, value in config.items():
        assert value == parameters[key].default, key


@pytest.mark.parametrize("config_name", CONFIG_NAMES)
def test_config_builds_a_quantizer_for_the_tiny_model(config_name):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"quantizer={config_name}", "codebook_size=256"])
    quantizer = instantiate(cfg.quantizer)
    z = torch.randn(2, cfg.model.embed_dim, 4, 4)
    out = quantizer(z)
    assert out.z_q.shape == z.shape and quantizer.codebook_size == 256


# -- LFQ ------------------------------------------------------------------------------------------


def all_sign_codes(bits: int) -> torch.Tensor:
    return torch.tensor([[1.0 if (k >> i) & 1 else -1.0 for i in range(bits)] for k in range(2**bits)])


def test_lfq_index_and_code_round_trip_over_all_codes():
    quantizer = LFQ(K, 6)
    indices = torch.arange(K)
    codes = quantizer.indices_to_codes(indices)
    assert torch.equal(codes, all_sign_codes(6))
    assert torch.equal(quantizer.codes_to_indices(codes), indices)
    out = quantizer(codes.t().reshape(1, 6, 8, 8))
    assert torch.equal(out.indices.flatten(), indices)
    torch.testing.assert_close(out.z_q, codes.t().reshape(1, 6, 8, 8))


def test_lfq_bit_order_puts_channel_zero_in_the_least_significant_bit():
    quantizer = LFQ(16, 4)
    z = torch.tensor([-1.0, -1.0, -1.0, -1.0]).repeat(4, 1)
    z[torch.arange(4), torch.arange(4)] = 1.0  # channel i alone positive
    assert quantizer(z.reshape(4, 4, 1, 1)).indices.flatten().tolist() == [1, 2, 4, 8]


@pytest.mark.parametrize("scale", [0.005, 0.05, 1.0])
def test_lfq_entropy_terms_equal_the_softmax_over_all_codes(scale):
    """MAGVIT-v2's definition, over an explicit tokens x 2^d matrix, against the factorised computation."""
    temperature, bits = 0.01, 6
    quantizer = LFQ(2**bits, bits, commitment_weight=0.0, entropy_weight=1.0, entropy_temperature=temperature,
                    sample_entropy_weight=0.6, codebook_entropy_weight=1.3)
    z = (torch.randn(2, bits, 4, 5, generator=torch.Generator().manual_seed(0)) * scale).requires_grad_()
    out = quantizer(z)
    out.loss.backward()

    z_ref = z.detach().double().requires_grad_()
    tokens = z_ref.permute(0, 2, 3, 1).reshape(-1, bits)
    logits = 2 * tokens @ all_sign_codes(bits).double().t() / temperature
    log_probs = torch.log_softmax(logits, dim=1)
    sample_entropy = -(log_probs.exp() * log_probs).sum(1).mean()
    average = log_probs.exp().mean(0)
    codebook_entropy = -(average * torch.log(average + 1e-5)).sum()
    (0.6 * sample_entropy - 1.3 * codebook_entropy).backward()

    assert float(out.stats["entropy/sample"]) == pytest.approx(sample_entropy.item(), rel=1e-4, abs=1e-6)
    assert float(out.stats["entropy/codebook"]) == pytest.approx(codebook_entropy.item(), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(z.grad.double(), z_ref.grad, rtol=1e-3, atol=1e-5 * float(z_ref.grad.abs().max()))


def test_lfq_codebook_entropy_blocks_match_one_block(monkeypatch):
    import ibq.quantizers.lfq as lfq

    z = torch.randn(3, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    results = []
    for budget in (2**5, 2**22):  # one token per block, then all tokens in one block
        monkeypatch.setattr(lfq, "CODE_PROBS_BUDGET", budget)
        z_leaf = z.clone().requires_grad_()
        out = LFQ(32, 5)(z_leaf)
        out.loss.backward()
        results.append((out.loss.detach(), z_leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("codebook_size", [1000, 3, 1])
def test_lfq_rejects_a_codebook_size_that_is_not_a_power_of_two(codebook_size):
    with pytest.raises(UserError, match=r"quantizer\.codebook_size=\d+ is invalid for lfq: it must be a power of two") as error:
        LFQ(codebook_size, 8)
    assert "\n" not in str(error.value)


# -- FSQ ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [[5, 4, 3], [8, 8, 4], [2, 3]])
def test_fsq_index_and_code_round_trip_over_all_codes(levels):
    codebook_size = math.prod(levels)
    quantizer = FSQ(codebook_size, len(levels), levels=levels)
    indices = torch.arange(codebook_size)
    codes = quantizer.indices_to_codes(indices)
    assert torch.equal(quantizer.codes_to_indices(codes), indices)
    assert len({tuple(code.tolist()) for code in codes}) == codebook_size
    assert codes.min() >= -1 and codes.max() <= 1

    # Inputs that the bounding maps exactly onto each grid point are quantized to that point.
    grid_values = codes * quantizer.half_width
    z = torch.atanh((grid_values + quantizer.offset) / quantizer.half_range) - quantizer.shift
    out = quantizer(z.t().reshape(1, len(levels), 1, codebook_size))
    assert torch.equal(out.indices.flatten(), indices)
    torch.testing.assert_close(out.z_q.reshape(len(levels), -1).t(), codes)


def test_fsq_default_levels_multiply_to_their_codebook_size():
    for codebook_size, levels in DEFAULT_LEVELS.items():
        assert math.prod(levels) == codebook_size
    assert FSQ(256, 64).levels == (8, 8, 4)
    assert FSQ(2**18, 64).levels == (8,) * 6


def test_fsq_rejects_levels_whose_product_is_not_the_codebook_size():
    with pytest.raises(UserError, match=r"quantizer\.levels=\[8, 8, 8\] has 512 codes but quantizer\.codebook_size=256") as error:
        FSQ(256, 8, levels=[8, 8, 8])
    assert "\n" not in str(error.value)


def test_fsq_without_default_levels_asks_for_levels():
    with pytest.raises(UserError, match=r"quantizer\.codebook_size=300 has no default FSQ levels.*quantizer\.levels"):
        FSQ(300, 8)


def test_fsq_rejects_a_level_below_two():
    with pytest.raises(UserError, match=r"quantizer\.levels"):
        FSQ(8, 8, levels=[8, 1])


# -- EMA-VQ ---------------------------------------------------------------------------------------


def skewed_batch(seed: int) -> torch.Tensor:
    """Every token near one point: a handful of codes take all of them."""
    generator = torch.Generator().manual_seed(seed)
    return 2.0 + 0.05 * torch.randn(4, D, 8, 8, generator=generator)


def test_ema_vq_dead_code_restart_lowers_the_dead_count_on_a_skewed_input():
    tokens_per_batch = 4 * 8 * 8
    outcomes = {}
    for threshold in (0.0, 0.5):
        torch.manual_seed(0)
        quantizer = EMAVQ(K, D, decay=0.9, dead_code_threshold=threshold)
        for step in range(30):
            out = quantizer(skewed_batch(step))
        dead = int((quantizer.cluster_size < 0.5 * tokens_per_batch / K).sum())
        outcomes[threshold] = (dead, float(out.stats["codebook/batch_utilization"]))
    (dead_without, used_without), (dead_with, used_with) = outcomes[0.0], outcomes[0.5]
    assert dead_with < dead_without
    assert used_with > used_without


def test_ema_vq_update_is_the_laplace_smoothed_moving_average():
    torch.manual_seed(0)
    quantizer = EMAVQ(K, D, decay=0.8, dead_code_threshold=0.0)
    z = encoder_output(quantizer)
    out = quantizer(z)
    tokens = z.permute(0, 2, 3, 1).reshape(-1, D)
    counts = torch.bincount(out.indices.flatten(), minlength=K).float()
    sums = torch.zeros(K, D).index_add_(0, out.indices.flatten(), tokens)
    torch.manual_seed(0)
    initial = torch.randn(K, D)
    cluster_size = 0.8 * 1.0 + 0.2 * counts
    embed_sum = 0.8 * initial + 0.2 * sums
    smoothed = (cluster_size + 1e-5) / (cluster_size.sum() + K * 1e-5) * cluster_size.sum()
    torch.testing.assert_close(quantizer.cluster_size, cluster_size)
    torch.testing.assert_close(quantizer.codebook, embed_sum / smoothed[:, None])


def test_ema_vq_does_not_update_in_eval_mode():
    quantizer = build("ema_vq").eval()
    before = {name: buffer.clone() for name, buffer in quantizer.named_buffers()}
    quantizer(encoder_output(quantizer))
    assert all(torch.equal(buffer, before[name]) for name, buffer in quantizer.named_buffers())


# -- one-line user errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: IBQ(K, D, chunk_size=0), "quantizer.chunk_size"),
        (lambda: IBQ(K, D, chunk_size=-4), "quantizer.chunk_size"),
        (lambda: IBQ(K, D, entropy_temperature=0), "quantizer.entropy_temperature"),
        (lambda: IBQ(K, D, entropy_temperature=-0.1), "quantizer.entropy_temperature"),
        (lambda: LFQ(K, D, entropy_temperature=0), "quantizer.entropy_temperature"),
        (lambda: EMAVQ(K, D, decay=1.0), "quantizer.decay"),
        (lambda: EMAVQ(K, D, dead_code_threshold=-1), "quantizer.dead_code_threshold"),
        (lambda: L2VQ(K, D, codebook_dim=0), "quantizer.codebook_dim"),
        (lambda: SimVQ(0, D), "quantizer.codebook_size"),
        (lambda: FSQ(K, 0, levels=[4, 4, 4]), "quantizer.dim"),
    ],
)
def test_bad_arguments_are_one_line_user_errors_naming_the_key(make, key):
    with pytest.raises(UserError) as error:
        make()
    message = str(error.value)
    assert key in message and "\n" not in message
