"""Relaunching jobs of a sweep, each into the directory Hydra gave it the first time.

Each job runs as a one-job multirun: `ibq-train -m hydra.sweep.dir=<sweep dir> <the job's overrides>`
(ibq-train-ar for stage-II sweeps).
Hydra then derives the same run directory from the same overrides, the W&B group stays the sweep
directory's name, the job resumes from its checkpoint when it has one, and it runs through whatever
launcher its cluster preset selects. Jobs of `cluster=local` run one after another, as in the
original sweep; jobs of other clusters are submitted together (each of those commands waits on its job).

Such a multirun rewrites <sweep dir>/multirun.yaml, so the ledger (sweep.json) is written first and
multirun.yaml is put back afterwards."""

from __future__ import annotations

import subprocess
import sys

from ibq.config import hydra_value
from ibq.ledger.sweep import JobStatus, Sweep

ENTRY_POINTS = {"train": "ibq.cli.train", "train_ar": "ibq.cli.train_ar"}  # primary config -> module


def train_command(status: JobStatus, sweep: Sweep) -> list[str]:
    hydra_overrides = sweep.plan.hydra_overrides if sweep.plan else []
    module = ENTRY_POINTS[sweep.plan.config_name if sweep.plan else "train"]
    return [
        sys.executable, "-m", module, "-m",
        f"hydra.sweep.dir={hydra_value(sweep.directory.resolve())}",
        *hydra_overrides,
        *status.overrides,
    ]


def runs_locally(status: JobStatus) -> bool:
    choices = status.job.choices if status.job else (status.run.choices if status.run else {})
    return choices.get("cluster", "local") == "local"


def relaunch(sweep: Sweep, statuses: list[JobStatus]) -> list[tuple[JobStatus, int]]:
    """Runs the jobs; returns each with its exit code. Output goes to this terminal."""
    sweep.save_ledger()
    multirun = sweep.directory / "multirun.yaml"
    recorded = multirun.read_bytes() if multirun.exists() else None
    results = []
    try:
        local = [s for s in statuses if runs_locally(s)]
        remote = [s for s in statuses if not runs_locally(s)]
        submitted = [(s, subprocess.Popen(train_command(s, sweep))) for s in remote]
        for status in local:
            results.append((status, subprocess.run(train_command(status, sweep)).returncode))
        results += [(s, process.wait()) for s, process in submitted]
    finally:
        if recorded is not None:
            multirun.write_bytes(recorded)
    return results
