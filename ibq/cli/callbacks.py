"""Hydra callbacks of the training apps (`hydra.callbacks` in their primary configs).

RunDirectoryCheck: a run or sweep directory that is a file, or not writable, is one line before Hydra
creates it. SweepProgress: each job of a sweep says `job k/N` when it starts and ends; a job that fails
does not stop the others (the task returns a JobFailed instead of raising); at the end one summary lists
every job, done or failed with its reason, and the command exits 1 when any failed. Each job leaves its
outcome in `<sweep dir>/.jobs/<k>.json`, so the summary is the same for Slurm jobs, which run elsewhere.
While the launcher waits for jobs that run elsewhere (Slurm, submitit's local processes), whose own lines
go to their logs, a progress bar on this console says where they stand (SweepWatch)."""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ibq.cli.checks import sweep_lines
from ibq.config import given_overrides, grid_sweeper
from ibq.engine.ranks import detect_ranks
from ibq.ledger.watch import sweep_snapshot
from ibq.runs.record import JOBS_DIR, job_records, write_json


@dataclass(frozen=True)
class JobFailed:
    """What a sweep's job returns instead of raising, so that the sweep goes on."""

    reason: str


def unusable_directory(path: Path) -> str | None:
    """Why `path` cannot be a run directory, or None: it (or a folder above it) is a file, or the
    nearest existing folder cannot be written to."""
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def refuse(key: str, path: str, problem: str) -> None:
    print(f"error: {key}={path} cannot hold the run: {problem}; choose another {key}", file=sys.stderr)
    sys.exit(2)


class RunDirectoryCheck(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        problem = unusable_directory(Path(config.hydra.run.dir))
        if problem:
            refuse("hydra.run.dir", config.hydra.run.dir, problem)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problem = unusable_directory(Path(config.hydra.sweep.dir))
        if problem:
            refuse("hydra.sweep.dir", config.hydra.sweep.dir, problem)


def count_jobs(config: DictConfig) -> int | None:
    """How many jobs the basic sweeper makes of the sweep files' params and the command line: the
    product of each swept key's number of values (a key on the command line replaces the sweep file's)."""
    if not grid_sweeper(config):
        return None  # another sweeper (Optuna) decides its trials as it goes
    try:
        values = {override.get_key_element(): len(list(override.sweep_string_iterator())) if override.is_sweep_override() else 1
                  for override in OverridesParser.create().parse_overrides(sweep_lines(config))}
    except Exception:  # a sweep the plain parser cannot expand (glob over a config group)
        return None
    return math.prod(values.values())


def outcome(job_return: JobReturn) -> tuple[str, str]:
    try:
        value = job_return.return_value  # raises what the task raised
    except Exception as error:
        return "failed", f"{type(error).__name__}: {error}"
    if isinstance(value, JobFailed):
        return "failed", value.reason
    return "done", ""


def jobs_run_elsewhere(config: DictConfig) -> bool:
    """Whether the launcher runs the jobs outside this process (submitit: Slurm jobs or local processes)."""
    return "submitit" in str(OmegaConf.select(config, "hydra.launcher._target_", default=""))


class SweepWatch(threading.Thread):
    """One progress bar over a sweep's jobs while the launcher waits for them: jobs' worth of work done (each
    running run counts by its share of its steps), and how many are done, failed, running (at which step),
    requeued and queued. It looks at the sweep folder every `poll_s` seconds; off a terminal (a log file) it
    writes at most once a minute."""

    # The watches of this process: on_multirun_end stops them, and so does the entry point when a launch ends in an
    # error (Hydra then calls no on_multirun_end). Not on the callback, which submitit pickles with every job.
    running: set[SweepWatch] = set()

    def __init__(self, sweep_dir: Path, total: int | None, label: str, poll_s: float = 5.0):
        super().__init__(name="sweep-watch", daemon=True)
        self.sweep_dir, self.total, self.label, self.poll_s = sweep_dir, total, label, poll_s
        self.since = time.time()
        self.stopping = threading.Event()

    def run(self) -> None:
        # The first look after one period: the launcher's own lines about the submission come first.
        if self.stopping.wait(self.poll_s):
            return
        snapshot = sweep_snapshot(self.sweep_dir, self.total, self.since)
        counted = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"  # tqdm puts ", " before the postfix
        # Log lines while the bar stands (a search's next batch) print above it, not onto its line.
        with logging_redirect_tqdm(), tqdm(total=self.total, initial=snapshot.work_done, postfix=snapshot.text(), desc=self.label,
                                           bar_format=counted if self.total else "{desc}: {elapsed}{postfix}",
                                           mininterval=1 if sys.stderr.isatty() else 60, miniters=0,  # miniters: by time alone
                                           dynamic_ncols=True) as bar:
            while not self.stopping.wait(self.poll_s):
                self.show(bar)
            self.show(bar)  # the jobs' last state, which closing the bar writes

    def show(self, bar: tqdm) -> None:
        snapshot = sweep_snapshot(self.sweep_dir, self.total, self.since)
        bar.set_postfix_str(snapshot.text(), refresh=False)
        bar.update(snapshot.work_done - bar.n)

    def start(self) -> None:
        SweepWatch.running.add(self)
        super().start()

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        SweepWatch.running.discard(self)

    @classmethod
    def stop_all(cls) -> None:
        for watch in list(cls.running):
            watch.stop()


class SweepProgress(Callback):
    def __init__(self) -> None:
        self.total: int | None = None

    def _label(self, config: DictConfig) -> str:
        number = config.hydra.job.num + 1
        return f"job {number}/{self.total}" if self.total else f"job {number}"

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.total = count_jobs(config)
        jobs = Path(config.hydra.sweep.dir) / JOBS_DIR
        for stale in jobs.glob("*.json"):  # a relaunch into the same sweep folder starts a new summary
            stale.unlink()
        if jobs_run_elsewhere(config):
            trials = OmegaConf.select(config, "hydra.sweeper.n_trials", default=None)
            where = OmegaConf.select(config, "cluster.name", default="submitit")
            SweepWatch(Path(config.hydra.sweep.dir), self.total or trials, f"{where} jobs").start()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or not detect_ranks().is_main:
            return
        print(f"{self._label(config)}: {' '.join(given_overrides(config.hydra)) or '(no overrides)'}", flush=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or not detect_ranks().is_main:  # a job of several ranks tells once
            return
        status, reason = outcome(job_return)
        print(f"{self._label(config)}: {status}{': ' + reason if reason else ''}", flush=True)
        record = {"num": config.hydra.job.num, "overrides": given_overrides(config.hydra), "status": status, "reason": reason}
        output_dir = Path(config.hydra.runtime.output_dir)
        if output_dir.is_dir():  # ibq-eval's stays empty and is gone: its results are in the evaluated run
            record["output_dir"] = str(output_dir)
        jobs = Path(config.hydra.sweep.dir) / JOBS_DIR
        jobs.mkdir(parents=True, exist_ok=True)
        write_json(jobs / f"{config.hydra.job.num}.json", record)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        SweepWatch.stop_all()
        sweep_dir = Path(config.hydra.sweep.dir)
        records = job_records(sweep_dir)
        # every job: a Slurm job's own lines are in its log, not on this console
        print("\n" + "\n".join(outcome_lines(sweep_dir, records, self.total or len(records), "without an outcome")), flush=True)
        if any(r["status"] != "done" for r in records) or len(records) < (self.total or 0):
            sys.exit(1)


def outcome_lines(sweep_dir: Path, records: list[dict], total: int, unreported_as: str) -> list[str]:
    """The sweep's counts, then each recorded job: done (with its folder) or failed with its reason."""
    failed = sum(r["status"] != "done" for r in records)
    unreported = total - len(records)
    counts = f"{len(records) - failed} of {total} jobs done, {failed} failed" + (f", {unreported} {unreported_as}" if unreported > 0 else "")
    lines = [f"sweep {sweep_dir}: {counts}"]
    for record in records:
        if record["status"] != "done":
            told = f"failed: {record['reason']}"
        else:
            told = f"done: {record['output_dir']}" if "output_dir" in record else "done"
        lines.append(f"  job {record['num'] + 1}/{total} ({' '.join(record['overrides'])}): {told}")
    return lines
