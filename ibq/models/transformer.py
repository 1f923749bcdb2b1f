"""Stage II: class-conditional Llama-style decoder over tokenizer indices (LlamaGen layout with VAR-style
AdaLN conditioning).

Sequence layout: position 0 holds the class embedding, position p >= 1 holds image token z_{p-1}; the
logits at position p predict z_p. Image tokens are in raster order over a square grid and carry 2D rotary
angles: the first half of every head's dims rotates with the row index, the second half with the column.
The class embedding is also the AdaLN condition of every block and of the head."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibq.errors import UserError


def ffn_hidden_size(width: int, multiple_of: int = 256) -> int:
    """SwiGLU hidden size of the reference: 2/3 of 4*width, rounded up to a multiple of 256."""
    return multiple_of * math.ceil(int(2 * 4 * width / 3) / multiple_of)


CLASS_TOKEN_ROPE = ("zero", "identity")


def rope_table(block_size: int, head_dim: int, base: float = 10000.0, class_token: str = "zero") -> Tensor:
    """(block_size, head_dim // 2, 2) cos/sin per sequence position and rotated pair.

    The class token (position 0): "zero" gives it an all-zero cos/sin row, so its query and key are zero,
    as in the reference (LlamaGen's table, which released checkpoints were trained with); "identity"
    leaves them unrotated, hence content-based."""
    if class_token not in CLASS_TOKEN_ROPE:
        raise UserError(f"transformer.class_token_rope={class_token!r} is invalid; valid: {', '.join(CLASS_TOKEN_ROPE)}")
    side = math.isqrt(block_size)
    quarter = head_dim // 4  # rotated pairs per axis
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    grid = torch.arange(side * side)
    rows, cols = (grid // side).double(), (grid % side).double()
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)
    angles = torch.cat([angles.new_zeros(1, 2 * quarter), angles[: block_size - 1]])
    table = torch.stack([angles.cos(), angles.sin()], dim=-1).float()
    if class_token == "zero":
        table[0] = 0.0
    return table


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate adjacent pairs of x (B, H, T, D) by table (T, D // 2, 2)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs.unbind(-1)
    cos, sin = table.unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


class KVCache:
    """Keys and values of every decoded position of one attention layer, preallocated for a whole sequence."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.keys = torch.zeros(batch, heads, length, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)

    def update(self, pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, n, D) at positions pos..pos+n-1; return everything up to and including them."""
        batch, end = k.shape[0], pos + k.shape[2]
        self.keys[:batch, :, pos:end] = k
        self.values[:batch, :, pos:end] = v
        return self.keys[:batch, :, :end], self.values[:batch, :, :end]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, pos: int) -> Tensor:
        keys, values = self.update(pos, k, v)
        # Several new positions only ever arrive at pos 0, where the plain causal mask is the right one;
        # a single new position sees every cached one.
        return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), is_causal=q.shape[2] > 1)


class StaticPosition(NamedTuple):
    """The position a static-cache step decodes, a 0-d device tensor, and its attention mask over the first
    `length` cache slots, made once per step for every layer: (1, length), 0 on the slots it sees, -inf
    after them (what attention makes of a boolean mask in every layer otherwise)."""

    index: Tensor
    mask: Tensor


class StaticKVCache(KVCache):
    """The cache at fixed shapes (gpt-fast's): one new position at a time, given on the device, written
    with index_copy_, and attention over the first `length` slots (the mask's width) with the slots after
    the position masked out. Every step of a length is then the same computation on the same tensors,
    which CUDA graphs can replay."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, pos: int | StaticPosition) -> Tensor:
        if isinstance(pos, int):  # the prefill, not replayed
            return super().attend(q, k, v, pos)
        self.keys.index_copy_(2, pos.index.view(1), k.to(self.keys.dtype))
        self.values.index_copy_(2, pos.index.view(1), v.to(self.values.dtype))
        length = pos.mask.shape[-1]
        keys, values = self.keys[:, :, :length], self.values[:, :, :length]
        return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=pos.mask.to(q.dtype))


@dataclass
class DecodeState:
    layers: list[KVCache]
    batch: int
    block_modulations: list[Tensor] = field(default_factory=list)  # fixed per sequence: they depend on the class only
    head_modulation: Tensor | None = None
    static: bool = False  # StaticKVCache layers, and modulations in preallocated tensors that prefill fills


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, resid_dropout: float):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.resid_drop = nn.Dropout(resid_dropout)

    def forward(self, x: Tensor, rope: Tensor, cache: KVCache | None = None, pos: int | StaticPosition = 0) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is None:
            # bf16/fp16 on CUDA, no mask, no dropout: the flash kernel (FlashAttention-2) takes it.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = cache.attend(q, k, v, pos)
        return self.resid_drop(self.proj(out.transpose(1, 2).reshape(b, t, c)))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    """Pre-norm block; the class condition sets per-channel gates, scales and shifts of both branches."""

    def __init__(self, width: int, heads: int, ffn_hidden: int, resid_dropout: float, ffn_dropout: float, norm_eps: float):
        super().__init__()
        self.attn_norm = nn.RMSNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads, resid_dropout)
        self.ffn_norm = nn.RMSNorm(width, eps=norm_eps)
        self.ffn = SwiGLU(width, ffn_hidden, ffn_dropout)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def modulation(self, cond: Tensor) -> Tensor:
        """(B, C) -> (B, 6, 1, C): gamma1, gamma2, scale1, scale2, shift1, shift2."""
        return self.ada_lin(cond).unflatten(1, (6, 1, -1))

    def forward(self, x: Tensor, modulation: Tensor, rope: Tensor, cache: KVCache | None = None, pos: int | StaticPosition = 0) -> Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = modulation.unbind(1)
        x = x + gamma1 * self.attn(self.attn_norm(x) * (1 + scale1) + shift1, rope, cache, pos)
        return x + gamma2 * self.ffn(self.ffn_norm(x) * (1 + scale2) + shift2)


class Transformer(nn.Module):
    def __init__(
        self,
        vocab_size: int = 16384,
        num_classes: int = 1000,
        block_size: int = 256,
        depth: int = 16,
        width: int = 1024,
        heads: int = 16,
        ffn_hidden: int | None = None,
        alng: float = 1e-3,
        class_dropout: float = 0.1,
        embed_dropout: float = 0.1,
        resid_dropout: float = 0.1,
        ffn_dropout: float = 0.1,
        norm_eps: float = 1e-5,
        rope_base: float = 10000.0,
        class_token_rope: str = "zero",
    ):
        super().__init__()
        if width % heads or (width // heads) % 4:
            raise UserError(
                f"transformer.width={width} with transformer.heads={heads} is invalid: width must be heads x a head size divisible by 4"
            )
        if math.isqrt(block_size) ** 2 != block_size:
            raise UserError(f"transformer.block_size={block_size} is invalid: it must be a square token grid (e.g. 256 = 16x16)")
        self.vocab_size, self.num_classes, self.block_size = vocab_size, num_classes, block_size
        self.width, self.heads, self.head_dim = width, heads, width // heads
        self.class_dropout = class_dropout

        self.tok_embed = nn.Embedding(vocab_size, width)
        self.class_embed = nn.Embedding(num_classes + 1, width)  # the last row is the null class of CFG
        self.embed_drop = nn.Dropout(embed_dropout)
        hidden = ffn_hidden or ffn_hidden_size(width)
        self.blocks = nn.ModuleList(Block(width, heads, hidden, resid_dropout, ffn_dropout, norm_eps) for _ in range(depth))
        self.head_norm = nn.RMSNorm(width, eps=norm_eps)
        self.head_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.register_buffer("rope", rope_table(block_size, self.head_dim, rope_base, class_token_rope), persistent=False)
        self.decode_state: DecodeState | None = None
        self._init_weights(alng)

    @property
    def null_class(self) -> int:
        return self.num_classes

    @torch.no_grad()
    def _init_weights(self, alng: float) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        # Blocks start close to identity: tiny gates (alng), halved scale/shift rows.
        for block in self.blocks:
            weight = block.ada_lin[-1].weight
            weight[: 2 * self.width].mul_(alng)
            weight[2 * self.width :].mul_(0.5)
        self.head_ada_lin[-1].weight.mul_(0.5)
        nn.init.zeros_(self.head.weight)

    def parameter_counts(self) -> dict[str, int]:
        def count(*modules: nn.Module) -> int:
            return sum(p.numel() for module in modules for p in module.parameters())

        counts = {
            "embeddings": count(self.tok_embed, self.class_embed),
            "blocks": count(self.blocks),
            "head": count(self.head_norm, self.head_ada_lin, self.head),
        }
        counts["total"] = sum(counts.values())
        return counts

    # -- shared pieces -------------------------------------------------------------------------
    def _conditions(self, labels: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        cond = self.class_embed(labels)
        return cond, [block.modulation(cond) for block in self.blocks], self.head_ada_lin(cond)

    def _trunk(self, x: Tensor, block_modulations: list[Tensor], pos: int | StaticPosition, cached: bool) -> Tensor:
        rope = self.rope[pos : pos + x.shape[1]] if isinstance(pos, int) else self.rope.index_select(0, pos.index.view(1))
        layers = self.decode_state.layers if cached else [None] * len(self.blocks)
        x = self.embed_drop(x)
        for block, modulation, cache in zip(self.blocks, block_modulations, layers):
            x = block(x, modulation, rope, cache, pos)
        return x

    def _head(self, x: Tensor, head_modulation: Tensor) -> Tensor:
        """x (B, T, C) -> logits (B, T, vocab_size)."""
        scale, shift = head_modulation.unsqueeze(-2).chunk(2, dim=-1)
        return self.head(self.head_norm(x) * (1 + scale) + shift)

    def _sequence(self, cond: Tensor, prefix: Tensor) -> Tensor:
        if prefix.shape[1] >= self.block_size:
            raise ValueError(f"{prefix.shape[1]} image tokens in the input, the model takes at most {self.block_size - 1}")
        return torch.cat([cond[:, None], self.tok_embed(prefix)], dim=1)

    # -- training ------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Teacher forcing: tokens (B, T) int64, labels (B,) -> logits (B, T, vocab_size), where logits[:, t]
        predicts tokens[:, t] from the class and tokens[:, :t]. In training mode a class_dropout share of
        the labels becomes the null class."""
        if tokens.shape[1] > self.block_size:
            raise ValueError(f"{tokens.shape[1]} tokens per sequence, the model was built for block_size={self.block_size}")
        if self.training and self.class_dropout > 0:
            dropped = torch.rand(labels.shape, device=labels.device) < self.class_dropout
            labels = labels.masked_fill(dropped, self.null_class)
        cond, block_modulations, head_modulation = self._conditions(labels)
        x = self._trunk(self._sequence(cond, tokens[:, :-1]), block_modulations, pos=0, cached=False)
        return self._head(x, head_modulation)

    # -- decoding ------------------------------------------------------------------------------
    def next_token_logits(self, labels: Tensor, prefix: Tensor) -> Tensor:
        """Without the cache: logits (B, vocab_size) of the image token that follows prefix (B, t), t >= 0."""
        cond, block_modulations, head_modulation = self._conditions(labels)
        x = self._trunk(self._sequence(cond, prefix), block_modulations, pos=0, cached=False)
        return self._head(x[:, -1:], head_modulation)[:, 0]

    def setup_cache(self, batch: int, dtype: torch.dtype | None = None, static: bool = False) -> None:
        """Preallocate keys/values for `batch` sequences of block_size positions. The default dtype is the
        autocast dtype when autocast is on, else the parameters' dtype.

        static=True: fixed shapes for torch.compile / CUDA graphs (StaticKVCache; prefill then takes
        exactly `batch` labels and step a 0-d tensor index). A static cache of the same batch and dtype
        is kept (its tensors keep their addresses, so a captured graph is replayed, not recorded again)."""
        device = self.head.weight.device
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else self.head.weight.dtype
        state = self.decode_state
        if static and state is not None and state.static and state.batch == batch and state.head_modulation.dtype == dtype:
            return
        cache = StaticKVCache if static else KVCache
        layers = [cache(batch, self.heads, self.block_size, self.head_dim, dtype, device) for _ in self.blocks]
        self.decode_state = DecodeState(layers=layers, batch=batch, static=static)
        if static:
            state = self.decode_state
            state.block_modulations = [torch.zeros(batch, 6, 1, self.width, dtype=dtype, device=device) for _ in self.blocks]
            state.head_modulation = torch.zeros(batch, 2 * self.width, dtype=dtype, device=device)
            if device.type == "cuda":
                # Tensors that the captured step reads and writes in place at fixed addresses, as
                # transformers' StaticCache marks them; else CUDA graphs would copy (or refuse) them.
                for tensor in (*state.block_modulations, state.head_modulation, *(t for layer in layers for t in (layer.keys, layer.values))):
                    torch._dynamo.mark_static_address(tensor)

    def reset_cache(self) -> None:
        """Free the cache."""
        self.decode_state = None

    def prefill(self, labels: Tensor, prefix: Tensor | None = None) -> Tensor:
        """Start cached decoding of len(labels) sequences: the class token (and optionally given leading image
        tokens prefix (B, t)) enter the cache; returns logits (B, vocab_size) of the next image token."""
        state = self.decode_state
        if state is None or len(labels) > state.batch:
            raise RuntimeError(f"call setup_cache(batch >= {len(labels)}) before prefill")
        cond, block_modulations, head_modulation = self._conditions(labels)
        if not state.static:
            state.block_modulations, state.head_modulation = block_modulations, head_modulation
        elif len(labels) != state.batch:
            raise RuntimeError(f"a static cache decodes exactly {state.batch} sequences, not {len(labels)}")
        else:
            for buffer, value in zip([*state.block_modulations, state.head_modulation], [*block_modulations, head_modulation]):
                buffer.copy_(value)
        prefix = labels.new_zeros(len(labels), 0) if prefix is None else prefix
        x = self._trunk(self._sequence(cond, prefix), state.block_modulations, pos=0, cached=True)
        return self._head(x[:, -1:], state.head_modulation)[:, 0]

    def step(self, tokens: Tensor, index: int | Tensor, length: int | None = None) -> Tensor:
        """Cached decoding: feed image token z_index (B,) after z_0..z_{index-1} are in the cache; returns
        logits (B, vocab_size) of z_{index+1}. With a static cache, index is a 0-d long tensor on the
        model's device (unchecked: reading it would wait for the device), and attention reads the first
        `length` cache slots (default all; at least index + 2, unchecked), a fixed number per compiled
        graph: see `attention_length`."""
        state = self.decode_state
        if state is None or state.head_modulation is None:
            raise RuntimeError("call setup_cache and prefill before step")
        if isinstance(index, Tensor) != state.static:
            raise TypeError("the index is a 0-d tensor with a static cache, an int otherwise")
        if not state.static and not 0 <= index < self.block_size - 1:
            raise ValueError(f"image token index {index} is outside 0..{self.block_size - 2}")
        pos = index + 1
        if state.static:
            length = length or self.block_size
            mask = torch.zeros(1, length, dtype=state.head_modulation.dtype, device=pos.device)
            pos = StaticPosition(pos, mask.masked_fill(torch.arange(length, device=pos.device) > pos, float("-inf")))
        x = self._trunk(self.tok_embed(tokens)[:, None], state.block_modulations, pos=pos, cached=True)
        return self._head(x, state.head_modulation)[:, 0]

    def attention_length(self, index: int, spans: int = 4) -> int:
        """The cache slots a static step at image token `index` reads: up to the end of the first of
        `spans` equal stretches of the cache that holds its index + 2 positions. Over a decoding, 4 spans
        read 5/8 of the keys and values that attending to the whole cache at every step reads (exact
        lengths would read 1/2), for 4 compiled graphs instead of one."""
        stretch = -(-self.block_size // spans)
        return min(self.block_size, -(-(index + 2) // stretch) * stretch)


def next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean cross-entropy over all positions; logits (B, T, V) from Transformer.forward(tokens, labels)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
