"""Is the process behind a run that says `running` still there? A run killed with SIGKILL, by the OOM
killer or with its node cannot record that it stopped, so its run.json keeps `status: running`.

True: alive; False: gone; None: cannot tell from here (another host without Slurm)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PROC = Path("/proc")
# How the training entry points appear on a command line: `python -m ibq.cli.train ...`, the console script, the file.
ENTRY_MODULES = ("ibq.cli.train", "ibq.cli.train_ar")
ENTRY_FILES = ("ibq-train", "ibq-train-ar", "ibq/cli/train.py", "ibq/cli/train_ar.py")


def run_process_alive(record: dict) -> bool | None:
    if record.get("slurm_job_id"):
        return slurm_job_alive(str(record["slurm_job_id"]))
    if record.get("host") != socket.gethostname() or not PROC.is_dir():
        return None
    started = parse_time(record.get("started"))
    if record.get("pid"):
        return pid_alive(int(record["pid"]), started)
    command = record.get("command") or []
    return any(process_started_before(pid, started) for pid in training_processes(command[1:]))


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S%z"))
    except ValueError:
        return None


def pid_alive(pid: int, started: float | None) -> bool:
    return (PROC / str(pid)).is_dir() and process_started_before(pid, started)


def entry_arguments(cmdline: list[str]) -> list[str] | None:
    """The arguments after a training entry point on a command line, or None when it is another program."""
    for i, arg in enumerate(cmdline):
        if arg in ENTRY_MODULES and i > 0 and cmdline[i - 1] == "-m":
            return cmdline[i + 1 :]
        if arg.endswith(ENTRY_FILES):
            return cmdline[i + 1 :]
    return None


def training_processes(arguments: list[str]) -> list[int]:
    """Processes on this host running the training entry point with these arguments."""
    own = os.getpid()
    pids = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        found = entry_arguments([arg for arg in cmdline if arg])
        if found is not None and found == arguments:
            pids.append(int(entry.name))
    return pids


def process_started_before(pid: int, moment: float | None) -> bool:
    """A process that started after the run recorded its start cannot be the one running it."""
    if moment is None:
        return True
    try:
        stat = (PROC / str(pid) / "stat").read_text()
        boot = next(float(line.split()[1]) for line in (PROC / "stat").read_text().splitlines() if line.startswith("btime"))
    except (OSError, StopIteration, ValueError):
        return True
    ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
    return boot + ticks / os.sysconf("SC_CLK_TCK") <= moment + 1


def slurm_job_alive(job_id: str) -> bool | None:
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    try:
        out = subprocess.run([squeue, "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # squeue fails for a job id it no longer knows
        return False if "Invalid job id" in out.stderr else None
    return bool(out.stdout.strip())
