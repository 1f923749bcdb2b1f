"""Where a sweep's jobs stand while the command that launched them waits for them: what each job recorded
as it ended (`<sweep dir>/.jobs/`), and the runs training now, with their last logged step. Read from the
sweep folder alone, so it is the same for Slurm jobs on other nodes and for local processes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ibq.ledger.runs import read_json, run_dirs
from ibq.ledger.sweep import last_logged_step
from ibq.runs.record import JOBS_DIR

SHOWN_RUNS = 4  # running runs whose steps the text lists; the others are counted


@dataclass(frozen=True)
class SweepSnapshot:
    total: int | None  # the jobs launched (None: not known ahead)
    done: int
    failed: int
    running: tuple[tuple[int | None, int | None], ...]  # (last logged step, steps) of each run training now
    requeued: int  # runs back in the queue after a requeue signal

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def work_done(self) -> float:
        """Jobs' worth of work behind the sweep: its finished jobs and each running run's share of its steps."""
        return self.finished + sum(min(step / steps, 1.0) for step, steps in self.running if step and steps)

    def text(self) -> str:
        """'1 done, 1 failed, 2 running (40/60, 12/60), 3 queued'."""
        parts = [f"{self.done} done"] + ([f"{self.failed} failed"] if self.failed else [])
        if self.running:
            steps = [f"{step or 0}/{steps}" if steps else f"step {step or 0}" for step, steps in self.running[:SHOWN_RUNS]]
            more = len(self.running) - SHOWN_RUNS
            parts.append(f"{len(self.running)} running ({', '.join(steps)}{f', +{more}' if more > 0 else ''})")
        if self.requeued:
            parts.append(f"{self.requeued} requeued")
        if self.total is not None:
            queued = self.total - self.finished - len(self.running) - self.requeued
            if queued > 0:
                parts.append(f"{queued} queued")
        return ", ".join(parts)


def sweep_snapshot(sweep_dir: Path, total: int | None, since: float) -> SweepSnapshot:
    """The sweep's jobs now. A run counts as running (or requeued) when its run.json says so and was written
    at or after `since` (the launch): a run left `running` by an earlier launch into the same folder, whose
    process is gone, is not one of this launch's jobs."""
    outcomes, finished_dirs = [], set()
    for path in sorted((Path(sweep_dir) / JOBS_DIR).glob("*.json")):
        record = read_json(path)
        if record is None:
            continue  # being replaced this moment, or torn: read at the next look
        outcomes.append(record.get("status"))
        if record.get("output_dir"):
            finished_dirs.add(Path(record["output_dir"]).resolve())
    running, requeued = [], 0
    for run_dir in run_dirs(Path(sweep_dir)):
        if run_dir.resolve() in finished_dirs:
            continue
        try:
            fresh = (run_dir / "run.json").stat().st_mtime >= since
        except OSError:
            continue
        record = read_json(run_dir / "run.json") if fresh else None
        if record is None:
            continue
        if record.get("status") == "running":
            running.append((logged_step(run_dir), record.get("total_steps")))
        elif record.get("status") == "requeued":
            requeued += 1
    done = sum(status == "done" for status in outcomes)
    return SweepSnapshot(total, done, len(outcomes) - done, tuple(running), requeued)


def logged_step(run_dir: Path) -> int | None:
    try:
        return last_logged_step(run_dir / "metrics.jsonl")
    except OSError:  # removed between the look and the read
        return None
