"""VQGAN-style tokenizer (taming-transformers encoder/decoder): encoder -> 1x1 conv -> quantizer ->
1x1 conv -> decoder. Attention sits at chosen levels rather than pixel resolutions, so one config
works at any image size (the paper's `attn_resolutions=[16]` at 256 px is level 4 of 5)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ibq.errors import UserError
from ibq.quantizers.base import QuantizerOutput


# What the backward pass recomputes instead of keeping (train.activation_checkpointing): nothing; each
# GroupNorm + SiLU pair, whose two fp32 outputs are most of a block's activations and cost one
# memory-bound pass to redo; or every block, a second forward pass of the networks.
RECOMPUTE = ("none", "norms", "blocks")


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, channels), num_channels=channels, eps=1e-6, affine=True)


def norm_act(norm: nn.Module, act: nn.Module, x: Tensor, recompute: bool) -> Tensor:
    """act(norm(x)); with `recompute` (in training) only x is kept for the backward pass."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(lambda h: act(norm(h)), x, use_reentrant=False)
    return act(norm(x))


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.branch = nn.Sequential(
            group_norm(in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.recompute = "none"  # one of RECOMPUTE, set by Tokenizer.set_activation_checkpointing

    def forward(self, x: Tensor) -> Tensor:
        norm1, act1, conv1, norm2, act2, dropout, conv2 = self.branch
        norms = self.recompute == "norms"
        h = conv1(norm_act(norm1, act1, x, norms))
        return self.shortcut(x) + conv2(dropout(norm_act(norm2, act2, h, norms)))


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hidden = self.norm(x)
        q, k, v = (conv(hidden).reshape(b, 1, c, h * w).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as in taming


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


def run_blocks(blocks: nn.Module, h: Tensor, recompute: str) -> Tensor:
    """Each block in turn; with recompute "blocks" (in training), its activations are recomputed in the
    backward pass instead of being kept."""
    checkpointing = recompute == "blocks" and torch.is_grad_enabled()
    for block in blocks:
        h = checkpoint(block, h, use_reentrant=False) if checkpointing else block(h)
    return h


def run_out(out: nn.Sequential, h: Tensor, recompute: str) -> Tensor:
    """The closing GroupNorm, SiLU and convolution."""
    norm, act, conv = out
    return conv(norm_act(norm, act, h, recompute == "norms"))


def stage(in_ch: int, out_ch: int, num_blocks: int, attention: bool, dropout: float) -> nn.ModuleList:
    layers = nn.ModuleList()
    for i in range(num_blocks):
        layers.append(ResBlock(in_ch if i == 0 else out_ch, out_ch, dropout))
        if attention:
            layers.append(AttnBlock(out_ch))
    return layers


def middle(channels: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResBlock(channels, channels, dropout), AttnBlock(channels), ResBlock(channels, channels, dropout))


class Encoder(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 4,
        attn_levels: Sequence[int] = (4,),
        z_channels: int = 256,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.levels = nn.ModuleList()
        channels = ch
        for level, mult in enumerate(ch_mult):
            blocks = stage(channels, ch * mult, num_res_blocks, level in attn_levels, dropout)
            channels = ch * mult
            if level != len(ch_mult) - 1:
                blocks.append(Downsample(channels))
            self.levels.append(blocks)
        self.mid = middle(channels, dropout)
        self.out = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, z_channels, 3, padding=1))
        self.recompute = "none"

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for blocks in self.levels:
            h = run_blocks(blocks, h, self.recompute)
        return run_out(self.out, run_blocks(self.mid, h, self.recompute), self.recompute)


class Decoder(nn.Module):
    def __init__(
        self,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 4,
        attn_levels: Sequence[int] = (4,),
        z_channels: int = 256,
        dropout: float = 0.0,
    ):
        super().__init__()
        channels = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, channels, 3, padding=1)
        self.mid = middle(channels, dropout)
        self.levels = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            blocks = stage(channels, ch * ch_mult[level], num_res_blocks + 1, level in attn_levels, dropout)
            channels = ch * ch_mult[level]
            if level != 0:
                blocks.append(Upsample(channels))
            self.levels.append(blocks)
        self.out = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.recompute = "none"

    def forward(self, z: Tensor) -> Tensor:
        h = run_blocks(self.mid, self.conv_in(z), self.recompute)
        for blocks in self.levels:
            h = run_blocks(blocks, h, self.recompute)
        return run_out(self.out, h, self.recompute)


class Tokenizer(nn.Module):
    """Images in [-1, 1] -> token indices -> reconstructions (not squashed; evaluation clamps)."""

    def __init__(self, encoder: Encoder, decoder: Decoder, quantizer: nn.Module, embed_dim: int):
        super().__init__()
        if getattr(quantizer, "dim", embed_dim) != embed_dim:
            raise UserError(
                f"quantizer.dim={quantizer.dim} does not match model.embed_dim={embed_dim}: "
                f"the quantizer receives embed_dim channels, so set both to the same value"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.quantizer = quantizer
        z_channels = encoder.out[-1].out_channels
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, decoder.conv_in.in_channels, 1)

    def set_activation_checkpointing(self, recompute: str) -> None:
        """What the backward pass recomputes: one of RECOMPUTE."""
        if recompute not in RECOMPUTE:
            raise ValueError(f"activation checkpointing {recompute!r}: valid are {', '.join(RECOMPUTE)}")
        for module in self.modules():
            if isinstance(module, (ResBlock, Encoder, Decoder)):
                module.recompute = recompute

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder.levels) - 1)

    def encode(self, images: Tensor) -> QuantizerOutput:
        return self.quantizer(self.quant_conv(self.encoder(images)))

    def decode(self, z_q: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.decode(self.quantizer.decode_indices(indices))

    def forward(self, images: Tensor) -> tuple[Tensor, QuantizerOutput]:
        quantized = self.encode(images)
        return self.decode(quantized.z_q), quantized

    def parameter_counts(self) -> dict[str, int]:
        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        counts = {
            "encoder": count(self.encoder),
            "decoder": count(self.decoder),
            "quant_convs": count(self.quant_conv) + count(self.post_quant_conv),
            "codebook": count(self.quantizer),
        }
        counts["generator_total"] = sum(counts.values())
        return counts
