"""Reference statistics of real image sets for FID: cached on disk, or read from a .npz with mu and sigma.

A cache entry is keyed by everything that determines the statistics: the dataset (its config), the split,
the resolution, the preprocessing between the dataset and the network, the network file's sha1, the
sample limit and the seed (training splits crop at seeded positions). So a sweep of tokenizers or
generators evaluated on the same real set extracts its features once. Entries are written to a temporary
file and renamed: concurrent jobs never read a torn file, and the last identical write wins."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ibq.data.splits import data_identity
from ibq.errors import UserError
from ibq.metrics.fid import FeatureStats
from ibq.runs.record import atomic_write

log = logging.getLogger(__name__)

# What happens between a dataset's [-1, 1] float images and the FID network; the network's own resize and
# scaling are part of its file, hence of its sha1.
PREPROCESSING = "[-1,1] float -> uint8 with rounding -> network"


def dataset_name(data_config: dict) -> str:
    """A short name of a data config: the builder's name, plus the root folder when it has one."""
    name = str(data_config.get("_target_", "data")).rsplit(".", 1)[-1].removeprefix("build_")
    return f"{name}:{data_config['root']}" if data_config.get("root") else name


@dataclass(frozen=True)
class ReferenceKey:
    dataset: dict[str, Any]  # the data config's identity (ibq.data.splits.data_identity)
    split: str
    resolution: int
    limit: int | None
    seed: int
    network_sha1: str
    preprocessing: str = PREPROCESSING

    def canonical(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)

    def digest(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:16]

    def filename(self) -> str:
        short = dataset_name(self.dataset).split(":", 1)[0]
        return f"{short}-{self.split}-{self.resolution}px-{self.digest()}.npz"


def reference_key(data_config: dict, split: str, limit: int | None, seed: int, network_sha1: str) -> ReferenceKey:
    dataset = data_identity(data_config)
    return ReferenceKey(dataset, split, int(dataset["resolution"]), limit, seed, network_sha1)


def validation_key(data_config: dict, seed: int, network) -> ReferenceKey | None:
    """The key of a data config's whole validation split, which every reconstruction evaluation (a run's own,
    ibq-eval's) compares against; None without an FID network."""
    return None if network is None else reference_key(data_config, "val", None, seed, network.sha1)


class ReferenceCache:
    """FeatureStats on disk, one .npz per ReferenceKey (count, sum, sum_outer, and the key as JSON)."""

    def __init__(self, directory: str | os.PathLike, refresh: bool = False):
        self.directory = Path(directory).expanduser()
        self.refresh = refresh

    def path(self, key: ReferenceKey) -> Path:
        return self.directory / key.filename()

    def load(self, key: ReferenceKey) -> FeatureStats | None:
        path = self.path(key)
        if self.refresh or not path.is_file():
            return None
        try:
            with np.load(path) as data:
                if str(data["key"]) != key.canonical():
                    return None
            return FeatureStats.from_npz(path)
        except (OSError, ValueError, KeyError) as error:
            log.warning("ignoring unreadable reference statistics %s (%s): recomputing them", path, error)
            return None

    def store(self, key: ReferenceKey, stats: FeatureStats) -> Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {name: tensor.cpu().numpy() for name, tensor in stats.state_dict().items()}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as file:  # a file object: np.savez would add .npz to a name
                np.savez(file, key=np.array(key.canonical()), **arrays)

        atomic_write(path, write, concurrent_writers=True)
        return path

    def get_or_compute(self, key: ReferenceKey, compute: Callable[[], FeatureStats]) -> tuple[FeatureStats, bool]:
        """The cached statistics (and True), or freshly computed and stored ones (and False)."""
        cached = self.load(key)
        if cached is not None:
            return cached, True
        stats = compute()
        self.store(key, stats)
        return stats, False


@dataclass
class ReferenceStats:
    """Mean and covariance of the real set's features, with the sample count when it is known."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None
    source: str

    @classmethod
    def from_feature_stats(cls, stats: FeatureStats, source: str) -> ReferenceStats:
        return cls(stats.mean().cpu().numpy(), stats.covariance().cpu().numpy(), stats.count, source)


def load_reference_npz(path: str | os.PathLike, dim: int) -> ReferenceStats:
    """mu/sigma (an ADM reference batch, clean-fid or pytorch-fid stats) or count/sum/sum_outer (FeatureStats)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reference.stats={path} not found (expected a .npz with mu and sigma)")
    try:
        data = np.load(path)
    except (OSError, ValueError) as error:
        raise UserError(f"reference.stats={path} is not a readable .npz ({error})") from None
    with data:
        if {"mu", "sigma"} <= set(data.files):
            mu, sigma, count = data["mu"].astype(np.float64), data["sigma"].astype(np.float64), None
        elif {"count", "sum", "sum_outer"} <= set(data.files):
            stats = FeatureStats(dim=data["sum"].shape[0])
            stats.load_state_dict({k: torch.from_numpy(data[k]) for k in ("count", "sum", "sum_outer")})
            if stats.count < 2:
                raise UserError(f"reference.stats={path} was accumulated over {stats.count} sample(s): FID needs at least 2")
            mu, sigma, count = stats.mean().numpy(), stats.covariance().numpy(), stats.count
        else:
            raise UserError(f"reference.stats={path} holds {', '.join(data.files) or 'nothing'}: expected mu and sigma")
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise UserError(
            f"reference.stats={path} has mu {mu.shape} and sigma {sigma.shape}: the FID network gives {dim}-d features, "
            f"so expected ({dim},) and ({dim}, {dim})"
        )
    return ReferenceStats(mu, sigma, count, str(path))
