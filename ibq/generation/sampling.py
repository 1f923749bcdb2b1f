"""Class-conditional sampling of token grids: classifier-free guidance, temperature, top-k / top-p.

With guidance the batch is doubled to [cond; null class] and each step uses
`uncond + cfg_scale * (cond - uncond)`; the sampled token is fed to both halves. cfg_scale = 1 is plain
conditional sampling (no doubling), 0 is unconditional, and a scale between them mixes the two. The
official sampler (LlamaGen's, which IBQ's sample script uses) guides only when cfg_scale > 1 and samples
plainly conditionally below that; a scale in (0, 1) is therefore applied here with a warning that says
so. Draws come from one torch.Generator, so a seed fixes the samples, with or without the KV cache.

The static cache (`static=True`, the default on CUDA) decodes at fixed shapes, gpt-fast's way: on CUDA
its step is compiled with mode="reduce-overhead", so each token replays one CUDA graph instead of
launching the step's ~700 kernels from the host; on CPU, and on a GPU Triton does not serve, it runs
eagerly and gives the same tokens as the dynamic cache. Drawing the tokens stays outside the graph, so
the generator's sequence is the same."""

from __future__ import annotations

import logging
import math
from functools import lru_cache

import torch
from torch import Tensor, nn

from ibq.errors import UserError
from ibq.inductor import gpu_kernels_unavailable
from ibq.models.transformer import Transformer

log = logging.getLogger(__name__)


def check_sampling_args(cfg_scale: float | None = None, temperature: float | None = None, top_k: int | None = None,
                        top_p: float | None = None) -> None:
    """The settings given (None: not given, e.g. ibq-sample's keys that keep the run's value)."""
    if cfg_scale is not None and (not math.isfinite(cfg_scale) or cfg_scale < 0):
        raise UserError(f"sampling.cfg_scale={cfg_scale} is invalid: it must be >= 0 (1: no guidance)")
    if cfg_scale is not None and 0 < cfg_scale < 1:
        note_guidance_below_one(cfg_scale)
    if temperature is not None and (not math.isfinite(temperature) or temperature <= 0):
        raise UserError(f"sampling.temperature={temperature} is invalid: it must be > 0")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise UserError(f"sampling.top_k={top_k!r} is invalid: it must be an integer >= 0 (0: off)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"sampling.top_p={top_p} is invalid: it must be in (0, 1] (1: off)")


@lru_cache(maxsize=None)  # once per value and process, not once per batch
def note_guidance_below_one(cfg_scale: float) -> None:
    log.warning("sampling.cfg_scale=%g is applied as uncond + %g * (cond - uncond), between unconditional (0) and "
                "conditional (1) sampling; the official sampler guides only above 1 and would sample plainly "
                "conditionally (as cfg_scale=1 does here)", cfg_scale, cfg_scale)


def check_labels(labels: Tensor, num_classes: int) -> None:
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        raise UserError(
            f"class index {outside[0].item()} is outside the model's classes: valid are 0..{num_classes - 1} "
            f"(transformer.num_classes={num_classes})"
        )


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf all but the top_k largest logits (0: keep all), then all outside the smallest set whose
    probability reaches top_p (1: keep all). logits: (B, V)."""
    if 0 < top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # a token is dropped when the more likely ones already reach top_p; the most likely always stays
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample(
    model: Transformer,
    labels: Tensor | list[int],
    num_tokens: int | None = None,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int = 0,
    use_cache: bool = True,
    static: bool | None = None,
) -> Tensor:
    """Sample (B, num_tokens) int64 image tokens in raster order for the classes `labels` (B,).

    num_tokens defaults to the model's block_size (the full grid). generator, when given, must be on the
    model's device and replaces seed. use_cache=False recomputes the whole prefix at every step (the
    reference path; same tokens, much slower). static: the fixed-shape cache (None: on CUDA), which
    stays allocated on the model for the next call of the same batch (model.reset_cache() frees it)."""
    check_sampling_args(cfg_scale, temperature, top_k, top_p)
    device = model.head.weight.device
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    check_labels(labels, model.num_classes)  # where the labels are: given as a list, without waiting for the GPU
    labels = labels.to(device)
    num_tokens = model.block_size if num_tokens is None else num_tokens
    if not 0 < num_tokens <= model.block_size:
        raise UserError(f"num_tokens={num_tokens} is invalid: the model generates 1..{model.block_size} tokens")
    if generator is None:
        generator = torch.Generator(device).manual_seed(seed)

    guided = cfg_scale != 1
    batch = len(labels)
    model_labels = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels

    def both_halves(tokens: Tensor) -> Tensor:
        return torch.cat([tokens, tokens]) if guided else tokens

    tokens = torch.zeros(batch, num_tokens, dtype=torch.long, device=device)
    static = use_cache and (device.type == "cuda" if static is None else static)
    graphs = static and replays_graphs(device)
    step = compiled_step(model) if graphs else model.step
    was_training = model.training
    model.eval()
    if use_cache:
        model.setup_cache(len(model_labels), static=static)
    try:
        for index in range(num_tokens):
            if not use_cache:
                logits = model.next_token_logits(model_labels, both_halves(tokens[:, :index]))
            elif index == 0:
                logits = model.prefill(model_labels)
            else:
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
                if static:
                    position = torch.full((), index - 1, device=device)
                    logits = step(both_halves(tokens[:, index - 1]), position, model.attention_length(index - 1))
                else:
                    logits = step(both_halves(tokens[:, index - 1]), index - 1)
            logits = logits.float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + cfg_scale * (cond - uncond)
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
            tokens[:, index] = torch.multinomial(probs, 1, generator=generator)[:, 0]
    finally:
        model.train(was_training)
        if use_cache and not static:
            model.reset_cache()
    return tokens


def hold_linear_weights_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every nn.Linear's weight and bias in `dtype`, for a model that only samples, under autocast to that
    dtype: autocast would cast them to it at every call, so the products are the same, bit for bit, and
    each token's step reads half the bytes of weights (inside a CUDA graph autocast's cast is not cached
    between tokens: every step would read the fp32 weights and write their copy). Embeddings and norms
    keep their dtype, and so the residual stream its precision."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.to(dtype)
    return model


def replays_graphs(device: torch.device) -> bool:
    """Whether the static step is compiled into CUDA graphs on `device`: on a GPU Triton serves."""
    if device.type != "cuda":
        return False
    unavailable = gpu_kernels_unavailable(device)
    if unavailable:
        note_eager_decoding(unavailable)
    return unavailable is None


@lru_cache(maxsize=None)  # once per reason and process, not once per batch
def note_eager_decoding(reason: str) -> None:
    log.warning("sampling decodes eagerly, without CUDA graphs: torch.compile cannot generate kernels here (%s)", reason)


def compiled_step(model: Transformer):
    """The model's static-cache step compiled for CUDA graphs, once per model: one graph per attention
    length (dynamic=False: each length a static shape, where Dynamo would make it a symbol)."""
    if getattr(model, "_compiled_step", None) is None:
        model._compiled_step = torch.compile(model.step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return model._compiled_step
