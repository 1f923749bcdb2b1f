"""Stage-II sampling speed: the KV cache's speedup at the tiny scale, and tokens/s per model scale.

The speedup compares sampling 256 tokens (tiny layout on a 16x16 grid, CFG) with and without the cache
(--speedup-tokens: fewer, in seconds; without the cache the cost grows with their square).
Tokens/s counts generated image tokens (a CFG pair counts once) over a shorter run at each scale that
fits here; on CPU only tiny and B run, larger scales are skipped with a note. On CUDA sampling runs
under bf16 autocast.

Run from the repository root: python -m benchmarks.bench_sampling [--batch 8] [--threads 1] [--tokens 32]
    [--speedup-tokens 256]
"""

import argparse
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchmarks.arguments import at_least
from ibq.generation import sample
from ibq.models.transformer import Transformer

AR_SCALES = Path(__file__).resolve().parents[1] / "conf" / "model_scale"
CPU_MAX_PARAMETERS = 400e6  # beyond B, CPU runs take minutes


def build(scale: str, device: torch.device, **overrides) -> Transformer:
    kwargs = OmegaConf.to_container(OmegaConf.load(AR_SCALES / f"{scale}.yaml").transformer)
    kwargs.pop("_target_")
    with torch.device(device):
        model = Transformer(**{**kwargs, **overrides})
    torch.nn.init.normal_(model.head.weight, std=0.02)  # a non-uniform distribution, as after training
    return model.eval()


def timed_sample(model: Transformer, batch: int, num_tokens: int, use_cache: bool, device: torch.device) -> float:
    labels = torch.arange(batch) % model.num_classes
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        sample(model, labels, num_tokens=num_tokens, cfg_scale=2.0, use_cache=use_cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start


def fits(scale: str, device: torch.device, batch: int) -> tuple[bool, str]:
    kwargs = OmegaConf.to_container(OmegaConf.load(AR_SCALES / f"{scale}.yaml").transformer)
    kwargs.pop("_target_")
    with torch.device("meta"):
        parameters = Transformer(**kwargs).parameter_counts()["total"]
    if device.type == "cpu":
        return parameters <= CPU_MAX_PARAMETERS, f"{parameters / 1e6:.0f}M parameters: too slow on CPU"
    cache = 2 * kwargs["depth"] * 2 * batch * kwargs["block_size"] * kwargs["width"] * 2  # bf16 keys + values
    needed = 4 * parameters + cache
    free = torch.cuda.mem_get_info(device)[0]
    return needed < 0.8 * free, f"needs ~{needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=at_least(1), default=8, help="images per batch; CFG doubles the model's batch")
    parser.add_argument("--threads", type=at_least(0), default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--tokens", type=at_least(1), default=32, help="tokens per image for the per-scale tokens/s")
    parser.add_argument("--speedup-tokens", type=at_least(1), default=256,
                        help="tokens per image for the KV cache's speedup at the tiny scale (its block size)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device}")
    print(f"torch_threads: {torch.get_num_threads()}")
    print(f"batch: {args.batch}")  # images; CFG runs the model on twice as many

    # On CUDA, bf16 attention runs on cuDNN, which builds a plan per new key length: the first pass over
    # all lengths is many times slower, so the warm-up there covers every length that is timed.
    full_warmup = device.type == "cuda"
    length = args.speedup_tokens
    tiny = build("tiny", device, block_size=length)
    timed_sample(tiny, args.batch, length if full_warmup else min(8, length), use_cache=True, device=device)
    if full_warmup:
        timed_sample(tiny, args.batch, length, use_cache=False, device=device)
    cached = timed_sample(tiny, args.batch, length, use_cache=True, device=device)
    uncached = timed_sample(tiny, args.batch, length, use_cache=False, device=device)
    print(f"tiny_{length}_tokens_cached_s: {cached:.4g}")
    print(f"tiny_{length}_tokens_uncached_s: {uncached:.4g}")
    print(f"ar_kv_cache_speedup: {uncached / cached:.1f}")
    print(f"ar_tokens_per_s_tiny: {args.batch * length / cached:.0f}")

    print(f"tokens_per_image: {args.tokens}")  # of each larger scale's tokens/s

    for scale in ("B", "L", "XL", "XXL"):
        ok, why = fits(scale, device, args.batch)
        if not ok:
            print(f"ar_tokens_per_s_{scale}: skipped ({why})")
            continue
        model = build(scale, device)
        timed_sample(model, args.batch, args.tokens if full_warmup else 2, use_cache=True, device=device)
        seconds = timed_sample(model, args.batch, args.tokens, use_cache=True, device=device)
        print(f"ar_tokens_per_s_{scale}: {args.batch * args.tokens / seconds:.1f}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
