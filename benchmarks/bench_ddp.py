"""Data-parallel training memory: the tokenizer step of two ranks under DDP, each rank's peak memory
over its steps and the size of its networks' gradients.

Each rank builds the real trainer (TokenizerTraining) and runs its step on random images: over gloo on
CPU (the paper's tokenizer at 32 px, so that a step takes seconds; its weights are the same at any
resolution), over nccl on a node with two GPUs (256 px, bf16). Peak memory is CUDA's allocator peak, or
on CPU the process's peak resident size (VmHWM, reset through /proc/self/clear_refs), over the steps
after the first two (DDP lays out its buckets again after the first). With --baseline (a git ref or a
checkout's folder) the same is measured for that code, alternating, --rounds times each, and
`<key>_vs_baseline` is old / new for memory and time (above 1 is better).

Run from the repository root: python -m benchmarks.bench_ddp [--scale paper] [--steps 4] [--baseline REF] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
WARMUP_STEPS = 2  # DDP builds its buckets again, in the order the gradients came, at the second step


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def reset_peak_rss() -> bool:
    """Linux resets VmHWM to the current RSS on writing 5 to clear_refs; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rank_main(rank: int, port: int, run_dir: str, overrides: list[str], steps: int, answers) -> None:
    """One rank: build the trainer, warm up, then measure `steps` steps."""
    import torch
    from hydra import compose, initialize_config_dir

    import ibq.cli.common  # noqa: F401  (registers the resolvers the configs use)
    from ibq.config import CONF_DIR
    from ibq.engine import distributed
    from ibq.engine.train_tokenizer import TokenizerTraining

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", "eval.rfid=false", "loss.perceptual_weight=0", *overrides])
    training = TokenizerTraining(cfg, Path(run_dir))
    device, resolution = training.device, cfg.data.resolution
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or WORLD_SIZE) // WORLD_SIZE))
    generator = torch.Generator().manual_seed(rank)
    images = [(torch.rand(training.layout.micro_batch, 3, resolution, resolution, generator=generator) * 2 - 1).to(device)]
    autocast = torch.autocast(device.type, dtype=training.dtype, enabled=training.dtype != torch.float32)

    def step(number: int) -> None:
        training._step(number, images, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        distributed.barrier()

    for number in range(1, WARMUP_STEPS + 1):
        step(number)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        peak_was_reset = True
    else:
        peak_was_reset = reset_peak_rss()
    started = time.perf_counter()
    for number in range(WARMUP_STEPS + 1, WARMUP_STEPS + steps + 1):
        step(number)
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else status_kib("VmHWM") * 2**10
    parameters = [*training.tokenizer.parameters(), *training.discriminator.parameters()]
    answers.put({
        "rank": rank,
        "peak_gib": peak / 2**30,
        "peak_was_reset": peak_was_reset,
        "gradient_gib": sum(p.grad.nbytes for p in parameters if p.grad is not None) / 2**30,  # the discriminator's too
        "step_s": seconds,
        "parameters_m": sum(p.numel() for p in parameters) / 1e6,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, gloo)",
        "torch": torch.__version__,
    })
    distributed.shutdown()


def worker(scale: str, steps: int) -> dict:
    """Both ranks of the code on sys.path, in processes of their own; their figures, the worst rank's."""
    import multiprocessing

    import torch

    from ibq.engine.ranks import free_port

    cuda = torch.cuda.device_count() >= WORLD_SIZE
    # 32 px on CPU: a step of seconds, the same weights and gradients as at 256 px.
    overrides = [f"model_scale={scale}", f"data.resolution={256 if cuda else 32}", "train.micro_batch_size=4" if cuda else "train.micro_batch_size=1",
                 f"train.batch_size={WORLD_SIZE * (4 if cuda else 1)}", f"train.device={'auto' if cuda else 'cpu'}"]
    context = multiprocessing.get_context("spawn")
    answers, port = context.Queue(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        ranks = [context.Process(target=rank_main, args=(rank, port, str(Path(tmp) / "run"), overrides, steps, answers))
                 for rank in range(WORLD_SIZE)]
        for process in ranks:
            process.start()
        reports = []
        while len(reports) < len(ranks):
            try:
                reports.append(answers.get(timeout=1))
            except queue.Empty:
                failed = [rank for rank, process in enumerate(ranks) if process.exitcode not in (None, 0)]
                if failed:  # the other rank waits for it in a collective
                    for process in ranks:
                        process.kill()
                    raise RuntimeError(f"rank {failed[0]} failed (exit code {ranks[failed[0]].exitcode}): its error is above")
        for process in ranks:
            process.join()
    worst = max(reports, key=lambda report: report["peak_gib"])
    return {**worst, "step_s": max(report["step_s"] for report in reports), "overrides": " ".join(overrides)}


def measure(code: Path, args: argparse.Namespace) -> dict:
    from benchmarks.bench_gpu import code_env

    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--scale", args.scale, "--steps", str(args.steps)]
    result = subprocess.run(command, cwd=code, env=code_env(code), capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"error: the benchmark failed for the code in {code}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    # Imported here, not at the top: a worker runs with the measured code's folder first on its path.
    from benchmarks.arguments import at_least
    from benchmarks.bench_gpu import checkout

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="paper", help="model_scale of the tokenizer (paper: 107M parameters + the codebook)")
    parser.add_argument("--steps", type=at_least(1), default=4, help="measured steps after the warm-up")
    parser.add_argument("--baseline", help="git ref or folder of the code to compare with")
    parser.add_argument("--rounds", type=at_least(1), default=1, help="measurements of each code, alternating (the best counts)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.scale, args.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        codes = {"current": REPO, **({"baseline": checkout(args.baseline, Path(tmp))} if args.baseline else {})}
        runs: dict[str, list[dict]] = {name: [] for name in codes}
        for _ in range(args.rounds):
            for name, code in codes.items():
                runs[name].append(measure(code, args))
    best = {name: {**measured[0], "peak_gib": min(run["peak_gib"] for run in measured), "step_s": min(run["step_s"] for run in measured)}
            for name, measured in runs.items()}
    current = best["current"]
    print(f"bench_ddp: device={current['device']}, torch={current['torch']}, ranks={WORLD_SIZE}, model_scale={args.scale}, "
          f"parameters={current['parameters_m']:.1f}M, overrides={current['overrides']}, steps={args.steps}, rounds={args.rounds}")
    print(f"ddp_tokenizer_gradient_gib: {current['gradient_gib']:.3f}")
    if not current["peak_was_reset"]:
        print("peak_rss_reset: no (/proc/self/clear_refs not writable: peaks include the setup)")
    for key in ("peak_gib", "step_s"):
        print(f"ddp_tokenizer_{key}: {current[key]:.3f}")
        if "baseline" in best:
            old = best["baseline"][key]
            print(f"ddp_tokenizer_{key}_baseline: {old:.3f}")
            print(f"ddp_tokenizer_{key}_vs_baseline: {old / current[key]:.3f}")


if __name__ == "__main__":
    main()
