"""FID's costs: frechet_distance on 2048-d statistics (Inception pool3's size), and a training run's
evaluation of the demo's tokenizer with the real FID network, the real images' statistics computed
against read from the cache that runs share (eval.reference_cache_dir), measured in the same run.

Run from the repository root: python -m benchmarks.bench_fid [--samples 4096] [--dim 2048] [--repeats 3] [--eval-images 144]
"""

import argparse
import tempfile
import time

import torch
from torch.utils.data import DataLoader, Subset

from benchmarks.arguments import at_least
from ibq.metrics.fid import FeatureStats, frechet_distance


def random_stats(samples: int, dim: int, seed: int) -> FeatureStats:
    generator = torch.Generator().manual_seed(seed)
    stats = FeatureStats(dim=dim)
    # Nonnegative and correlated, like post-ReLU pool3 features.
    mixing = torch.randn(dim, dim, generator=generator) / dim**0.5
    stats.update((torch.randn(samples, dim, generator=generator) @ mixing).relu())
    return stats


def frechet_seconds(samples: int, dim: int, repeats: int) -> tuple[float, float]:
    """(the distance, the fastest of `repeats` timed calls)."""
    a, b = random_stats(samples, dim, seed=0), random_stats(samples, dim, seed=1)
    mu1, sigma1, mu2, sigma2 = a.mean(), a.covariance(), b.mean(), b.covariance()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = frechet_distance(mu1, sigma1, mu2, sigma2)
        timings.append(time.perf_counter() - start)
    return value, min(timings)


def evaluation_seconds(images: int, repeats: int) -> tuple[float, float]:
    """Seconds of the demo's final evaluation (the tiny tokenizer, untrained: the cost does not depend on its
    weights) over its first `images` validation crops: (real statistics computed, read from the cache), the
    fastest of `repeats` alternating pairs."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import ibq.cli.common  # noqa: F401  (registers the resolvers the configs use)
    from ibq.config import CONF_DIR, build
    from ibq.engine.evaluate import ReconstructionEvaluator
    from ibq.metrics.fid import load_fid_network
    from ibq.metrics.reference import ReferenceCache, validation_key

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none"])
    tokenizer = build(cfg.model, quantizer=build(cfg.quantizer))
    val = build(cfg.data, seed=cfg.seed).val
    loader = DataLoader(Subset(val, range(min(images, len(val)))), batch_size=cfg.eval.batch_size)
    network = load_fid_network()
    computed, cached = [], []
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = ReferenceCache(cache_dir)
        key = validation_key(OmegaConf.to_container(cfg.data, resolve=True), cfg.seed, network)
        # Untimed: fills the cache, and warms the network up (TorchScript optimises its first calls).
        ReconstructionEvaluator(loader, torch.device("cpu"), fid_network=network, reference_cache=cache,
                                reference_key=key)(tokenizer, cfg.codebook_size)
        for _ in range(repeats):
            for use_cache, timings in ((False, computed), (True, cached)):
                evaluator = ReconstructionEvaluator(loader, torch.device("cpu"), fid_network=network,
                                                    reference_cache=cache if use_cache else None, reference_key=key)
                start = time.perf_counter()
                evaluator(tokenizer, cfg.codebook_size)
                timings.append(time.perf_counter() - start)
                assert evaluator.reference_cached is (True if use_cache else None)
    return min(computed), min(cached)


def main(samples: int, dim: int, repeats: int, eval_images: int) -> None:
    value, seconds = frechet_seconds(samples, dim, repeats)
    print(f"torch_threads: {torch.get_num_threads()}")
    print(f"fid: {value:.6f}")
    print(f"frechet_distance_{dim}_seconds: {seconds:.4g}")
    computed, cached = evaluation_seconds(eval_images, repeats)
    print(f"tiny_eval_images: {eval_images}")
    print(f"tiny_eval_s_real_stats_computed: {computed:.3f}")
    print(f"tiny_eval_s_real_stats_cached: {cached:.3f}")
    print(f"tiny_eval_cached_speedup: {computed / cached:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=at_least(2), default=4096, help="feature vectors per set")
    parser.add_argument("--dim", type=at_least(1), default=2048, help="feature dimensions (pool3: 2048)")
    parser.add_argument("--repeats", type=at_least(1), default=3, help="timed calls, the fastest counting")
    parser.add_argument("--eval-images", type=at_least(2), default=144, help="validation crops evaluated (the demo's: 144)")
    args = parser.parse_args()
    main(args.samples, args.dim, args.repeats, args.eval_images)
