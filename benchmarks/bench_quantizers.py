"""Memory and time of quantizer forward + backward, each measured in a fresh process.

1. IBQ at the paper's largest size (K = 262144, D = 256, N = 1024 tokens = one 4-image batch at 256 px),
   chunked against dense: the peak RSS that forward + backward adds on top of the inputs and parameters,
   and its time. Prints `ibq_chunked_peak_memory_ratio` and `ibq_chunked_time_ratio` (chunked / dense).
2. Chunked IBQ alone at K = 2^20.
3. Every quantizer at K = 16384 side by side (D = 256; LFQ with 14 sign bits, FSQ with its default
   levels for 16384, so neither needs a projection).

Inputs follow IBQ's initialisation: codebook N(0, 1), z N(0, 1); the upstream gradient of z_q is N(0, 1).
Run from the repository root: python -m benchmarks.bench_quantizers [--chunk-size 8192] [--skip-dense]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOKENS_SHAPE = (4, 16, 16)  # batch, height, width: N = 1024 tokens
REPO_ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak_rss() -> bool:
    """Linux resets VmHWM to the current RSS on writing 5 to clear_refs; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(spec: dict) -> dict:
    """Build one quantizer, then time `repeats` forward + backward passes after `warmup` untimed ones."""
    import torch
    from hydra.utils import get_class

    torch.manual_seed(0)
    quantizer = get_class(spec["target"])(**spec["kwargs"]).train()
    batch, height, width = TOKENS_SHAPE
    z = torch.randn(batch, quantizer.dim, height, width)
    upstream = torch.randn_like(z)

    def step() -> float:
        z_leaf = z.clone().requires_grad_()
        quantizer.zero_grad(set_to_none=True)
        started = time.perf_counter()
        out = quantizer(z_leaf)
        ((out.z_q * upstream).sum() + out.loss).backward()
        return time.perf_counter() - started

    for _ in range(spec["warmup"]):
        step()
    quantizer.zero_grad(set_to_none=True)
    peak_was_reset = _reset_peak_rss()
    baseline_kib = _status_kib("VmRSS")
    timings = [step() for _ in range(spec["repeats"])]
    peak_kib = _status_kib("VmHWM")
    return {
        "seconds": statistics.median(timings),
        "peak_added_bytes": (peak_kib - baseline_kib) * 1024,
        "peak_bytes": peak_kib * 1024,
        "baseline_bytes": baseline_kib * 1024,
        "peak_was_reset": peak_was_reset,
        "threads": torch.get_num_threads(),
    }


def measure(target: str, warmup: int = 0, repeats: int = 1, **kwargs) -> dict:
    spec = {"target": target, "kwargs": kwargs, "warmup": warmup, "repeats": repeats}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_quantizers", "--worker", json.dumps(spec)],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"worker for {target} {kwargs} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.3f} GiB"


def main(chunk_size: int, skip_dense: bool) -> None:
    ibq = "ibq.quantizers.IBQ"
    k_paper, dim = 262144, 256
    print(f"IBQ forward+backward, K={k_paper}, D={dim}, N={TOKENS_SHAPE[0] * TOKENS_SHAPE[1] * TOKENS_SHAPE[2]} tokens, "
          f"chunk_size={chunk_size}, each in a fresh process")
    chunked = measure(ibq, codebook_size=k_paper, dim=dim, chunk_size=chunk_size)
    print(f"  chunked: {chunked['seconds']:.2f} s, peak added {gib(chunked['peak_added_bytes'])} "
          f"(process peak {gib(chunked['peak_bytes'])}, torch threads {chunked['threads']})")
    if not skip_dense:
        dense = measure(ibq, codebook_size=k_paper, dim=dim)
        print(f"  dense:   {dense['seconds']:.2f} s, peak added {gib(dense['peak_added_bytes'])} "
              f"(process peak {gib(dense['peak_bytes'])})")
        if not (dense["peak_was_reset"] and chunked["peak_was_reset"]):
            print("  note: /proc/self/clear_refs was not writable, so peaks include the setup's")
        print(f"ibq_chunked_peak_memory_ratio: {chunked['peak_added_bytes'] / dense['peak_added_bytes']:.4f}")
        print(f"ibq_chunked_time_ratio: {chunked['seconds'] / dense['seconds']:.4f}")

    k_max = 2**20
    largest = measure(ibq, codebook_size=k_max, dim=dim, chunk_size=chunk_size)
    print(f"IBQ chunked, K={k_max}, D={dim}: {largest['seconds']:.2f} s, peak added {gib(largest['peak_added_bytes'])}, "
          f"process peak {gib(largest['peak_bytes'])}")
    print(f"ibq_chunked_2pow20_seconds: {largest['seconds']:.2f}")
    print(f"ibq_chunked_2pow20_process_peak_gib: {largest['peak_bytes'] / 2**30:.3f}")

    k_small = 16384
    lineup = [
        ("ibq (dense)", ibq, dict(dim=dim)),
        ("ibq (chunked)", ibq, dict(dim=dim, chunk_size=min(chunk_size, k_small))),
        ("vq", "ibq.quantizers.VQ", dict(dim=dim)),
        ("ema_vq", "ibq.quantizers.EMAVQ", dict(dim=dim)),
        ("l2_vq (8-dim lookup)", "ibq.quantizers.L2VQ", dict(dim=dim)),
        ("simvq", "ibq.quantizers.SimVQ", dict(dim=dim)),
        ("lfq (14 bits)", "ibq.quantizers.LFQ", dict(dim=14)),
        ("fsq (8,8,8,8,4)", "ibq.quantizers.FSQ", dict(dim=5)),
    ]
    print(f"Every quantizer, K={k_small}, forward+backward (median of 3 after 1 warm-up), peak added")
    for name, target, kwargs in lineup:
        result = measure(target, warmup=1, repeats=3, codebook_size=k_small, **kwargs)
        print(f"  {name:<22} {result['seconds'] * 1000:9.1f} ms   {result['peak_added_bytes'] / 2**20:8.1f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk-size", type=int, default=8192)
    parser.add_argument("--skip-dense", action="store_true", help="skip the dense K=262144 run (~8 GB, minutes on CPU)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
    else:
        main(args.chunk_size, args.skip_dense)
