import copy
import logging

import pytest
import torch

from conftest import graph_host_reads
from ibq.errors import UserError
from ibq.generation import filter_logits, hold_linear_weights_in, sample
from ibq.generation.sampling import replays_graphs
from ibq.models.transformer import Transformer


@pytest.fixture(scope="module")
def model() -> Transformer:
    """Visible gates and a random head, so classes and guidance change the distribution."""
    torch.manual_seed(0)
    model = Transformer(vocab_size=64, num_classes=5, block_size=16, depth=2, width=64, heads=2, alng=1.0)
    torch.nn.init.normal_(model.head.weight, std=0.3)
    return model


LABELS = [0, 3, 4, 1, 2, 0, 4, 3]  # enough draws that a cache bug shows up as a differing token


@pytest.mark.parametrize(
    "settings",
    [
        dict(cfg_scale=1.0),
        dict(cfg_scale=2.5, temperature=1.2),
        dict(cfg_scale=0.0),
        dict(cfg_scale=4.0, top_k=10, top_p=0.9),
        dict(cfg_scale=1.0, top_k=5, top_p=0.8),
    ],
)
def test_cached_and_uncached_sampling_agree(model, settings):
    cached = sample(model, LABELS, seed=7, static=False, **settings)
    uncached = sample(model, LABELS, seed=7, use_cache=False, **settings)
    assert cached.shape == (8, 16) and cached.dtype == torch.long
    assert 0 <= cached.min() and cached.max() < 64
    assert torch.equal(cached, uncached)
    # The fixed-shape cache (CUDA's default) draws the same tokens, also when reused by the next call.
    for _ in range(2):
        assert torch.equal(sample(model, LABELS, seed=7, static=True, **settings), cached)
    assert model.decode_state.static
    model.reset_cache()


def test_sampling_is_deterministic_per_seed_and_batched(model):
    first = sample(model, LABELS, cfg_scale=2.0, seed=1)
    assert torch.equal(first, sample(model, LABELS, cfg_scale=2.0, seed=1))
    assert not torch.equal(first, sample(model, LABELS, cfg_scale=2.0, seed=2))
    generator = torch.Generator().manual_seed(1)
    assert torch.equal(first, sample(model, LABELS, cfg_scale=2.0, generator=generator))
    assert sample(model, LABELS, num_tokens=5).shape == (8, 5)


def test_sampling_leaves_the_model_as_it_was(model):
    model.train()
    sample(model, LABELS, num_tokens=3)
    assert model.training and model.decode_state is None
    model.eval()


def greedy_guided_tokens(model, scale: float) -> torch.Tensor:
    """The tokens of greedy decoding on uncond + scale * (cond - uncond), written out step by step."""
    model.eval()
    labels = torch.tensor(LABELS)
    null = torch.full_like(labels, model.null_class)
    tokens = labels.new_zeros(len(labels), 0)
    for _ in range(model.block_size):
        cond, uncond = model.next_token_logits(labels, tokens), model.next_token_logits(null, tokens)
        tokens = torch.cat([tokens, (uncond + scale * (cond - uncond)).argmax(dim=-1, keepdim=True)], dim=1)
    return tokens


def test_guidance_follows_uncond_plus_scale_times_difference(model):
    """top_k=1 makes sampling greedy: every token is the argmax of the guided logits, with the chosen
    token fed to the conditional and the unconditional sequence alike."""
    assert torch.equal(sample(model, LABELS, cfg_scale=3.0, top_k=1), greedy_guided_tokens(model, 3.0))


def test_guidance_below_one_mixes_towards_unconditional_and_says_how_it_differs_from_the_official_sampler(model, caplog):
    expected = greedy_guided_tokens(model, 0.375)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(sample(model, LABELS, cfg_scale=0.375, top_k=1), expected)
        sample(model, LABELS, cfg_scale=0.375, top_k=1)
    notes = [record.getMessage() for record in caplog.records if "official sampler guides only above 1" in record.getMessage()]
    assert len(notes) == 1 and notes[0].startswith("sampling.cfg_scale=0.375 is applied as uncond + 0.375 * (cond - uncond)")


def test_filter_logits():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].sum().item()  # noqa: E731
    assert kept(0.5) == 1
    assert kept(probs[0].item() + 0.01) == 2
    assert kept((probs[0] + probs[1]).item() + 0.01) == 3
    assert kept(1.0) == 5
    assert torch.isfinite(filter_logits(logits, top_k=3, top_p=0.99)).sum() == 3


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(cfg_scale=-0.5), "sampling.cfg_scale=-0.5 is invalid: it must be >= 0"),
        (dict(top_p=0.0), "sampling.top_p=0.0 is invalid: it must be in (0, 1]"),
        (dict(top_p=1.5), "sampling.top_p=1.5 is invalid: it must be in (0, 1]"),
        (dict(temperature=0.0), "sampling.temperature=0.0 is invalid: it must be > 0"),
        (dict(top_k=-1), "sampling.top_k=-1 is invalid"),
        (dict(labels=[0, 5]), "class index 5 is outside the model's classes: valid are 0..4"),
        (dict(labels=[-1]), "class index -1 is outside the model's classes: valid are 0..4"),
        (dict(num_tokens=17), "num_tokens=17 is invalid: the model generates 1..16 tokens"),
    ],
)
def test_bad_sampling_input_is_one_clear_line(model, settings, message):
    settings = {"labels": LABELS, **settings}
    with pytest.raises(UserError) as error:
        sample(model, **settings)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("static", [False, True])
def test_linear_weights_held_in_the_autocast_dtype_draw_the_same_tokens(model, static):
    """What ibq-sample does in bf16: the products autocast would have cast are the same bits."""
    held = hold_linear_weights_in(copy.deepcopy(model), torch.bfloat16)
    assert held.head.weight.dtype == held.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert held.tok_embed.weight.dtype == held.class_embed.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = sample(model, LABELS, seed=7, cfg_scale=2.5, static=static)
        assert torch.equal(sample(held, LABELS, seed=7, cfg_scale=2.5, static=static), expected)
    model.reset_cache()


def test_the_step_is_replayed_as_cuda_graphs_only_on_a_gpu_triton_serves(gpu_reported, caplog):
    """Elsewhere the static step runs eagerly, where torch.compile would fail at the first token."""
    assert not replays_graphs(torch.device("cpu"))
    gpu_reported((9, 0))
    assert replays_graphs(torch.device("cuda")) and replays_graphs(torch.device("cuda", 0))
    gpu_reported((6, 1), "Tesla P4")
    with caplog.at_level(logging.WARNING):
        assert not replays_graphs(torch.device("cuda")) and not replays_graphs(torch.device("cuda", 0))
    assert caplog.text.count("sampling decodes eagerly, without CUDA graphs: torch.compile cannot generate kernels here "
                             "(Tesla P4 has compute capability 6.1, and Triton needs 7.0 or more)") == 1  # once per process


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the CUDA-graph step is CUDA's default")
def test_cuda_graph_sampler_draws_the_dynamic_cache_tokens():
    torch.manual_seed(0)
    model = Transformer(vocab_size=64, num_classes=5, block_size=16, depth=2, width=64, heads=2, alng=1.0).cuda()
    torch.nn.init.normal_(model.head.weight, std=0.3)
    dynamic = sample(model, LABELS, seed=7, cfg_scale=2.5, static=False)
    for _ in range(2):  # compiled and captured, then replayed
        assert torch.equal(sample(model, LABELS, seed=7, cfg_scale=2.5), dynamic)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # as ibq-sample draws in bf16
        dynamic = sample(model, LABELS, seed=7, cfg_scale=2.5, static=False)
        held = hold_linear_weights_in(model, torch.bfloat16)
        for _ in range(2):
            assert torch.equal(sample(held, LABELS, seed=7, cfg_scale=2.5), dynamic)
        # Replayed, the decoding loop never waits for the GPU: the host launches step after step ahead of it.
        torch.cuda.set_sync_debug_mode("error")
        try:
            replayed = sample(held, LABELS, seed=7, cfg_scale=2.5)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(replayed, dynamic)


def greedy_static_decoding(model, step) -> torch.Tensor:
    """The logits of every position of a greedy decoding through `step` on a fresh static cache."""
    labels = torch.tensor(LABELS + [model.null_class] * len(LABELS))
    model.eval()
    model.reset_cache()
    model.setup_cache(len(labels), static=True)
    try:
        logits = [model.prefill(labels)]
        for index in range(model.block_size - 1):
            logits.append(step(logits[-1].argmax(dim=-1), torch.full((), index), model.attention_length(index)))
    finally:
        model.reset_cache()
        model.train()
    return torch.stack(logits)


def test_the_static_step_traces_as_one_graph_per_attention_length(model, whole_graph):
    """On CUDA the sampler compiles the static step with fullgraph=True and replays it as CUDA graphs: a
    graph break would fail there, a graph per position would record a new CUDA graph at every token, and
    a value read back to the host makes CUDA graphs step aside. Dynamo traces the same way on CPU, so all
    three are checked here: one graph for each of the 4 attention lengths. Through AOTAutograd, which
    turns the cache's in-place writes into copies back to the cache tensors as Inductor receives them,
    the decoding gives the eager logits too, and so does attending to the whole cache at every step."""
    lengths = sorted({model.attention_length(index) for index in range(model.block_size - 1)})
    assert lengths == [4, 8, 12, 16] and model.block_size == 16
    traced_step, graphs = whole_graph(model.step, dynamic=False)
    eager = greedy_static_decoding(model, model.step)
    assert torch.equal(greedy_static_decoding(model, traced_step), eager)
    assert len(graphs) == len(lengths)  # automatic dynamic shapes would make a second length a symbol
    assert all(graph_host_reads(graph) == [] for graph in graphs)
    with torch.no_grad():  # as in sample()
        functional = greedy_static_decoding(model, torch.compile(model.step, backend="aot_eager", fullgraph=True, dynamic=False))
        assert torch.equal(functional, eager)
        whole_cache = greedy_static_decoding(model, lambda tokens, index, length: model.step(tokens, index))
    assert torch.allclose(whole_cache, eager, rtol=1e-5, atol=1e-6)
