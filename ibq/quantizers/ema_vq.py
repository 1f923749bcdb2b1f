"""Vector quantization with an exponential-moving-average codebook (VQ-VAE, van den Oord et al. 2017,
appendix; Razavi et al. 2019), with dead-code restart.

The codebook is a buffer, not a parameter: in training mode each forward pass updates, with
decay lambda,
    N_k <- lambda N_k + (1 - lambda) n_k,    m_k <- lambda m_k + (1 - lambda) sum_{i -> k} z_i,
    e_k = m_k / N~_k,   N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j   (Laplace smoothing),
after the batch has been quantized with the previous codebook (so in training mode decode_indices
sees the updated codes). The loss is the commitment term only. Counts and sums are summed over
ranks under torch.distributed.

Dead-code restart: a code whose EMA count N_k falls below `dead_code_threshold` x (tokens per batch / K)
(that fraction of a uniform share; an absolute threshold such as SoundStream's 2 would mark nearly every
code dead when K >> tokens per batch) is replaced by a random vector of the current batch, and its count
reset to one uniform share. 0 disables it.

Each code starts as if it had been assigned one vector equal to itself (N_k = 1, m_k = e_k), so an
unused code stays where it is instead of being divided by a vanishing count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ibq.errors import UserError, check_positive_int
from ibq.quantizers.base import Quantizer, QuantizerOutput, batch_usage_stats, to_tokens
from ibq.quantizers.chunked import nearest_code


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class EMAVQ(Quantizer):
    def __init__(
        self,
        codebook_size: int,
        dim: int,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        epsilon: float = 1e-5,
        dead_code_threshold: float = 0.1,
    ):
        super().__init__()
        self.codebook_size = check_positive_int("quantizer.codebook_size", codebook_size)
        self.dim = check_positive_int("quantizer.dim", dim)
        if not 0.0 <= decay < 1.0:
            raise UserError(f"quantizer.decay={decay} is invalid: it must be in [0, 1)")
        if dead_code_threshold < 0:
            raise UserError(f"quantizer.dead_code_threshold={dead_code_threshold} is invalid: it must be >= 0 (0 disables restarts)")
        self.decay = decay
        self.commitment_weight = commitment_weight
        self.epsilon = epsilon
        self.dead_code_threshold = dead_code_threshold
        codebook = torch.randn(codebook_size, dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", codebook.clone())


    def dead_codes(self, tokens_per_batch: int) -> Tensor:
        """Mask of the codes whose EMA count is below the restart threshold."""
        return self.cluster_size < self.dead_code_threshold * tokens_per_batch / self.codebook_size

    def _quantize(self, z: Tensor) -> QuantizerOutput:
        tokens = to_tokens(z)
        indices = nearest_code(tokens, self.codebook)
        quantized = self.codebook[indices]
        commitment = F.mse_loss(tokens, quantized)
        stats = {"loss/commitment": commitment.detach(), **batch_usage_stats(indices, self.codebook_size)}
        if self.training:
            stats.update(self._update(tokens.detach(), indices))
        return QuantizerOutput.from_tokens(
            tokens + (quantized - tokens).detach(), indices, self.commitment_weight * commitment, stats, z.shape
        )

    @torch.no_grad()
    def _update(self, tokens: Tensor, indices: Tensor) -> dict[str, Tensor]:
        counts = torch.bincount(indices, minlength=self.codebook_size).to(tokens.dtype)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, tokens)
        tokens_per_batch = torch.tensor(float(len(tokens)), device=tokens.device)
        if _distributed():
            for tensor in (counts, sums, tokens_per_batch):
                dist.all_reduce(tensor)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.embed_sum.lerp_(sums, 1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        self.codebook.copy_(self.embed_sum / smoothed[:, None])

        dead = self.dead_codes(int(tokens_per_batch))
        dead_count = int(dead.sum())  # a restart draws this many replacements: the host needs the count
        if self.dead_code_threshold > 0 and dead_count:
            replacements = tokens[torch.randint(len(tokens), (dead_count,), device=tokens.device)]
            if _distributed():
                dist.broadcast(replacements, src=0)  # the same restart on every rank
            share = tokens_per_batch / self.codebook_size
            self.codebook[dead] = replacements
            self.embed_sum[dead] = replacements * share
            self.cluster_size[dead] = share
        return {"codebook/ema_dead": dead.sum().double()}

    def decode_indices(self, indices: Tensor) -> Tensor:
        return F.embedding(indices, self.codebook).permute(0, 3, 1, 2)
