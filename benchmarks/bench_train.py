"""Training throughput of the tiny tokenizer and the share of step time spent waiting for data.

Runs the real main job (no W&B, no rFID) for a short while and reads the figures it logged. With
--baseline (a git ref or a checkout's folder) the same job of that code runs alternately with this
one, --rounds times each, and the ratio of their best throughputs is printed: on a shared machine,
runs side by side see the same load.
Run from the repository root: python -m benchmarks.bench_train [steps] [--baseline REF] [--rounds 3]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.arguments import at_least
from benchmarks.bench_gpu import checkout, code_env

REPO = Path(__file__).resolve().parents[1]


def timed_training_args(steps: int) -> list[str]:
    """Overrides of a run whose logged throughput windows are averaged by `logged_throughput`: every 25
    steps, or every half of a shorter run, so that at least one window follows the first."""
    return [f"train.steps={steps}", f"train.log_every={max(1, min(25, steps // 2))}", "logger=none", "eval.rfid=false"]


def logged_throughput(run_dir: Path) -> tuple[float, float]:
    """(images/s, data-wait share) of a finished run, averaged over its logged windows but the first,
    which includes the start (compilation, loader workers)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [line for line in lines if "throughput/images_per_s" in line][1:]
    images_per_s = sum(line["throughput/images_per_s"] for line in timed) / len(timed)
    wait_share = sum(line["throughput/data_wait_share"] for line in timed) / len(timed)
    return images_per_s, wait_share


def throughput(code: Path, steps: int) -> tuple[float, float]:
    """(images/s, data-wait share) of one run of the code in `code`."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "bench"
        command = [sys.executable, "-m", "ibq.cli.train", *timed_training_args(steps), "data.val_crops_per_photo=1",
                   f"hydra.run.dir={run_dir}"]
        subprocess.run(command, check=True, capture_output=True, cwd=code, env=code_env(code))
        return logged_throughput(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="?", type=at_least(2), default=150)
    parser.add_argument("--baseline", help="git ref or folder of the code to compare with")
    parser.add_argument("--rounds", type=at_least(1), default=3, help="runs of each code with --baseline (the best counts)")
    args = parser.parse_args()
    if not args.baseline:
        images_per_s, wait_share = throughput(REPO, args.steps)
        print(f"tiny_train_images_per_s: {images_per_s:.1f}")
        print(f"tiny_train_data_wait_share: {wait_share:.4f}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        baseline = checkout(args.baseline, Path(tmp))
        best = {"current": 0.0, "baseline": 0.0}
        for _ in range(args.rounds):
            for name, code in (("baseline", baseline), ("current", REPO)):
                best[name] = max(best[name], throughput(code, args.steps)[0])
    print(f"tiny_train_images_per_s: {best['current']:.1f}")
    print(f"tiny_train_images_per_s_baseline: {best['baseline']:.1f}")
    print(f"tiny_train_images_per_s_vs_baseline: {best['current'] / best['baseline']:.3f}")


if __name__ == "__main__":
    main()
