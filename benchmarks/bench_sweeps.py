"""Planning a sweep: wall and CPU time of `ibq-sweep plan` for 64 jobs (codebook_scaling x 8 seeds),
one of them already completed under --runs. The plan composes one config per set of group choices, so
it should answer in seconds on an idle machine.

Run from the repository root: python -m benchmarks.bench_sweeps
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ibq.ledger.plan import expand

SWEEP = ["codebook_scaling", "model_scale=tiny", "seed=0,1,2,3,4,5,6,7"]


def main() -> None:
    plan = expand([f"sweep={SWEEP[0]}", *SWEEP[1:]])
    with tempfile.TemporaryDirectory() as runs:
        done = Path(runs) / "one"
        done.mkdir()
        (done / "run.json").write_text(json.dumps({"signature": plan.jobs[9].signature, "status": "completed"}))
        (done / "results.json").write_text("{}")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "ibq.cli.sweep", "plan", *SWEEP, "--runs", runs],
                                capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(result.stderr)
    print(f"jobs: {len(plan.jobs)}")
    print(f"plan_wall_s: {wall:.2f}")
    print(f"plan_cpu_s: {after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime:.2f}")
    print(f"load_average_1min: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
