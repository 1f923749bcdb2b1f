"""Memory and time of quantizer forward + backward, each measured in a fresh process.

1. IBQ at the paper's largest size (K = 262144, D = 256, N = 1024 tokens = one 4-image batch at 256 px),
   chunked against dense: the peak RSS that forward + backward adds on top of the inputs and parameters,
   and its time. Prints `ibq_chunked_peak_memory_ratio` and `ibq_chunked_time_ratio` (chunked / dense).
2. Chunked IBQ alone at K = 2^20.
3. Every quantizer at K = 16384 side by side (D = 256; LFQ with 14 sign bits, FSQ with its default
   levels for 16384, so neither needs a projection).

`--size tiny` runs the same at N = 64, D = 32 and K = 4096, 16384 and 1024, in seconds (CI keeps it alive).
Inputs follow IBQ's initialisation: codebook N(0, 1), z N(0, 1); the upstream gradient of z_q is N(0, 1).
Each figure is one `key: value` line, times in ms (the median of the timed passes), memory in MiB.

Run from the repository root: python -m benchmarks.bench_quantizers [--size tiny] [--chunk-size 8192] [--skip-dense]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time

from benchmarks.arguments import at_least
from benchmarks.bench_ddp import reset_peak_rss, status_kib

# (batch, height, width) of the tokens, D, K of parts 1, 2 and 3, and the default chunk size.
SIZES = {
    "real": {"tokens": (4, 16, 16), "dim": 256, "k_paper": 262144, "k_max": 2**20, "k_lineup": 16384, "chunk": 8192},
    "tiny": {"tokens": (1, 8, 8), "dim": 32, "k_paper": 4096, "k_max": 16384, "k_lineup": 1024, "chunk": 512},
}
IBQ = "ibq.quantizers.IBQ"
MIB = 2**20


def worker(target: str, tokens_shape: tuple[int, int, int], warmup: int, repeats: int, kwargs: dict) -> dict:
    """Build one quantizer, then time `repeats` forward + backward passes after `warmup` untimed ones."""
    import torch
    from hydra.utils import get_class

    torch.manual_seed(0)
    quantizer = get_class(target)(**kwargs).train()
    batch, height, width = tokens_shape
    z = torch.randn(batch, quantizer.dim, height, width)
    upstream = torch.randn_like(z)

    def step() -> float:
        z_leaf = z.clone().requires_grad_()
        quantizer.zero_grad(set_to_none=True)
        started = time.perf_counter()
        out = quantizer(z_leaf)
        ((out.z_q * upstream).sum() + out.loss).backward()
        return time.perf_counter() - started

    for _ in range(warmup):
        step()
    quantizer.zero_grad(set_to_none=True)
    peak_was_reset = reset_peak_rss()
    # Reset, the high-water mark is the RSS of that moment and can only grow: the peak added is never negative,
    # as it was against a VmRSS read a moment later, which a small quantizer's steps need not exceed.
    baseline_kib = status_kib("VmHWM" if peak_was_reset else "VmRSS")
    timings = [step() for _ in range(repeats)]
    peak_kib = status_kib("VmHWM")
    return {
        "ms": statistics.median(timings) * 1e3,
        "peak_added_mib": (peak_kib - baseline_kib) / 1024,
        "process_peak_mib": peak_kib / 1024,
        "peak_was_reset": peak_was_reset,
        "threads": torch.get_num_threads(),
    }


def _measure_into(sender, *args) -> None:
    sender.send(worker(*args))


class FreshProcesses:
    """Runs each measurement in a process of its own, forked from a server that has imported torch once
    (a fresh interpreter per measurement would spend seconds importing it each time)."""

    def __init__(self, tokens_shape: tuple[int, int, int]):
        self.tokens_shape = tokens_shape
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["torch", "hydra.utils", "ibq.quantizers"])

    def measure(self, target: str, warmup: int = 0, repeats: int = 1, **kwargs) -> dict:
        receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(target=_measure_into,
                                       args=(sender, target, self.tokens_shape, warmup, repeats, kwargs))
        process.start()
        sender.close()  # so that the receiver sees the end if the process dies without sending
        try:
            return receiver.recv()
        except EOFError:  # it died without sending
            pass
        finally:
            process.join()
        why = (f"was killed by signal {-process.exitcode} (out of memory? the dense IBQ at the real size "
               f"needs ~8 GB: --skip-dense)" if process.exitcode < 0 else "failed (its traceback is above)")
        sys.exit(f"error: the process measuring {target} {kwargs} {why}")


def print_figures(name: str, codebook_size: int, result: dict) -> None:
    print(f"{name}_fwd_bwd_ms_k{codebook_size}: {result['ms']:.3f}")
    print(f"{name}_peak_mib_k{codebook_size}: {result['peak_added_mib']:.1f}")
    print(f"{name}_process_peak_mib_k{codebook_size}: {result['process_peak_mib']:.1f}")


def main(size: str, chunk_size: int | None, skip_dense: bool) -> None:
    from ibq.quantizers.fsq import resolve_levels

    sizes = SIZES[size]
    chunk_size = chunk_size or sizes["chunk"]
    dim, k_paper, k_max, k_lineup = sizes["dim"], sizes["k_paper"], sizes["k_max"], sizes["k_lineup"]
    processes = FreshProcesses(sizes["tokens"])
    batch, height, width = sizes["tokens"]
    print(f"tokens: {batch * height * width}")
    print(f"dim: {dim}")
    print(f"chunk_size: {chunk_size}")

    chunked = processes.measure(IBQ, codebook_size=k_paper, dim=dim, chunk_size=chunk_size)
    print(f"torch_threads: {chunked['threads']}")
    print_figures("ibq_chunked", k_paper, chunked)
    if skip_dense:
        for key in (f"ibq_dense_fwd_bwd_ms_k{k_paper}", f"ibq_dense_peak_mib_k{k_paper}", f"ibq_dense_process_peak_mib_k{k_paper}",
                    "ibq_chunked_peak_memory_ratio", "ibq_chunked_time_ratio"):
            print(f"{key}: skipped (--skip-dense)")
    else:
        dense = processes.measure(IBQ, codebook_size=k_paper, dim=dim)
        print_figures("ibq_dense", k_paper, dense)
        print(f"ibq_chunked_peak_memory_ratio: {chunked['peak_added_mib'] / dense['peak_added_mib']:.4f}")
        print(f"ibq_chunked_time_ratio: {chunked['ms'] / dense['ms']:.4f}")
    print(f"peak_rss_reset: {'yes' if chunked['peak_was_reset'] else 'no (/proc/self/clear_refs not writable: peaks include the setup)'}")

    largest = processes.measure(IBQ, codebook_size=k_max, dim=dim, chunk_size=chunk_size)
    print_figures("ibq_chunked", k_max, largest)

    # LFQ with log2(K) sign bits and FSQ with its default levels for K: neither needs a projection.
    lineup = [
        ("ibq_dense", IBQ, dict(dim=dim)),
        ("ibq_chunked", IBQ, dict(dim=dim, chunk_size=min(chunk_size, k_lineup))),
        ("vq", "ibq.quantizers.VQ", dict(dim=dim)),
        ("ema_vq", "ibq.quantizers.EMAVQ", dict(dim=dim)),
        ("l2_vq", "ibq.quantizers.L2VQ", dict(dim=dim)),  # its default 8-dim lookup
        ("simvq", "ibq.quantizers.SimVQ", dict(dim=dim)),
        ("lfq", "ibq.quantizers.LFQ", dict(dim=k_lineup.bit_length() - 1)),
        ("fsq", "ibq.quantizers.FSQ", dict(dim=len(resolve_levels(k_lineup, None)))),
    ]
    print("lineup_timing: median of 3 after 1 warm-up")
    for name, target, kwargs in lineup:
        print_figures(name, k_lineup, processes.measure(target, warmup=1, repeats=3, codebook_size=k_lineup, **kwargs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="real", help="real: the paper's sizes; tiny: CI's")
    parser.add_argument("--chunk-size", type=at_least(1), help="chunked IBQ's chunk_size: logits held per token (default: 8192; tiny: 512)")
    parser.add_argument("--skip-dense", action="store_true", help="skip the dense IBQ at K=262144 (~8 GB, minutes on CPU)")
    args = parser.parse_args()
    main(args.size, args.chunk_size, args.skip_dense)
