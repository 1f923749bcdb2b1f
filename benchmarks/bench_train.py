"""Training throughput of the tiny tokenizer and the share of step time spent waiting for data.

Runs the real main job (no W&B, no rFID) for a short while and reads the figures it logged.
Run from the repository root: python -m benchmarks.bench_train [steps]
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main(steps: int = 150, warmup_lines: int = 1) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "bench"
        command = [sys.executable, "-m", "ibq.cli.train", f"train.steps={steps}", "train.log_every=25",
                   "logger=none", "eval.rfid=false", "data.val_crops_per_photo=1", f"hydra.run.dir={run_dir}"]
        subprocess.run(command, check=True, capture_output=True)
        lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [l for l in lines if "throughput/images_per_s" in l][warmup_lines:]
    images_per_s = sum(l["throughput/images_per_s"] for l in timed) / len(timed)
    wait_share = sum(l["throughput/data_wait_share"] for l in timed) / len(timed)
    print(f"tiny_train_images_per_s: {images_per_s:.1f}")
    print(f"tiny_train_data_wait_share: {wait_share:.4f}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
