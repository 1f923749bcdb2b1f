"""Time frechet_distance on 2048-d statistics, the size of Inception pool3 features.

Run from the repository root: python -m benchmarks.bench_fid [--samples 4096] [--dim 2048] [--repeats 3]
"""

import argparse
import time

import torch

from benchmarks.arguments import at_least
from ibq.metrics.fid import FeatureStats, frechet_distance


def random_stats(samples: int, dim: int, seed: int) -> FeatureStats:
    generator = torch.Generator().manual_seed(seed)
    stats = FeatureStats(dim=dim)
    # Nonnegative and correlated, like post-ReLU pool3 features.
    mixing = torch.randn(dim, dim, generator=generator) / dim**0.5
    stats.update((torch.randn(samples, dim, generator=generator) @ mixing).relu())
    return stats


def main(samples: int = 4096, dim: int = 2048, repeats: int = 3) -> None:
    a, b = random_stats(samples, dim, seed=0), random_stats(samples, dim, seed=1)
    mu1, sigma1, mu2, sigma2 = a.mean(), a.covariance(), b.mean(), b.covariance()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = frechet_distance(mu1, sigma1, mu2, sigma2)
        timings.append(time.perf_counter() - start)
    print(f"torch_threads: {torch.get_num_threads()}")
    print(f"fid: {value:.6f}")
    print(f"frechet_distance_{dim}_seconds: {min(timings):.4g}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=at_least(2), default=4096, help="feature vectors per set")
    parser.add_argument("--dim", type=at_least(1), default=2048, help="feature dimensions (pool3: 2048)")
    parser.add_argument("--repeats", type=at_least(1), default=3, help="timed calls, the fastest counting")
    args = parser.parse_args()
    main(args.samples, args.dim, args.repeats)
