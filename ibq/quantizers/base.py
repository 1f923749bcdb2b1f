"""The contract every quantizer honours, so the engine never branches on a quantizer's name."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibq.errors import UserError


@dataclass
class QuantizerOutput:
    z_q: Tensor  # (B, D, H, W): what the decoder receives
    indices: Tensor  # (B, H, W) int64
    loss: Tensor  # scalar: the quantizer's whole weighted loss
    # per-batch figures for logging: detached 0-d tensors, read on the host only at log steps
    stats: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def from_tokens(cls, z_q: Tensor, indices: Tensor, loss: Tensor, stats: dict[str, Tensor], z_shape: torch.Size) -> QuantizerOutput:
        """From per-token results in raster order ((B*H*W, D) codes, (B*H*W,) indices), shaped back like
        the encoder output `z_shape`."""
        b, _, h, w = z_shape
        return cls(to_map(z_q, z_shape), indices.reshape(b, h, w), loss, stats)


class Quantizer(nn.Module):
    """Shared entry: checks the input and quantizes in fp32, since code selection compares
    distances or logits over K codes that bf16/fp16 would blur. Subclasses implement `_quantize`."""

    dim: int

    def forward(self, z: Tensor) -> QuantizerOutput:
        check_input(z, self.dim)
        with torch.autocast(device_type=z.device.type, enabled=False):
            out = self._quantize(z.float())
        out.z_q = out.z_q.to(z.dtype)
        return out

    def _quantize(self, z: Tensor) -> QuantizerOutput:
        raise NotImplementedError


def check_input(z: Tensor, dim: int) -> None:
    if z.ndim != 4 or z.shape[1] != dim:
        raise UserError(
            f"quantizer.dim={dim} does not match the encoder output of shape {tuple(z.shape)}: "
            f"set model.embed_dim and quantizer.dim to the same value"
        )


def to_tokens(z: Tensor) -> Tensor:
    """(B, D, H, W) -> (B*H*W, D) in raster order."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def to_map(tokens: Tensor, like_shape: torch.Size) -> Tensor:
    """(B*H*W, D) -> (B, D, H, W)."""
    b, d, h, w = like_shape
    return tokens.reshape(b, h, w, d).permute(0, 3, 1, 2)


def selected_codes(codebook: Tensor, indices: Tensor) -> Tensor:
    """codebook[indices], with a gradient that sums each code's tokens in a fixed order. Indexing's backward
    (index_put_ with accumulate) sums them in the order a CPU's threads take them: the same step would differ in
    its last bits from call to call, and two runs of one command would drift apart. Embedding's backward is
    deterministic on CPU and CUDA."""
    return F.embedding(indices, codebook)


def batch_usage_stats(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Usage within one batch; the exact whole-set figures come from ibq.metrics.codebook.
    Nothing here waits for the device: a scatter-add, not bincount (whose CUDA kernel reads the
    largest index on the host), and xlogy, not boolean indexing."""
    flat = indices.flatten()
    counts = flat.new_zeros(codebook_size).scatter_add_(0, flat, torch.ones_like(flat)).double()
    probs = counts / counts.sum()
    entropy = -torch.special.xlogy(probs, probs).sum()
    return {
        "codebook/batch_utilization": (counts > 0).double().mean(),
        "codebook/batch_perplexity": entropy.exp(),
    }
