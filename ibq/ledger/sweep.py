"""A sweep directory and the state of each of its jobs.

The jobs a sweep should have come from its ledger file (sweep.json, written by `ibq-sweep launch` and
before a retry) or, for a sweep started with `ibq-train -m`, from Hydra's multirun.yaml (the command
line and the sweeper params it recorded, expanded again). Each job is matched to its run directory
(by the directory Hydra gives it, else by signature), or to a completed run with the same signature
elsewhere. Run directories that match no job are listed as well."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from ibq.config import APPS, given_overrides, sqlite_file
from ibq.errors import UserError
from ibq.ledger.cost import KINDS
from ibq.ledger.liveness import run_process_alive
from ibq.ledger.plan import Job, Plan, expand
from ibq.ledger.runs import Run, completed_runs, load_json, load_run, load_sampling, read_json, run_dirs, sampling_dirs
from ibq.runs.record import job_records, sweep_group, timestamp, write_json

LEDGER_FILE = "sweep.json"
RETRYABLE = ("failed", "preempted", "interrupted", "missing")
STATE_ORDER = ("done", "running", "pending", "interrupted", "preempted", "failed", "missing")


@dataclass
class JobStatus:
    job: Job | None  # None: a run directory that no planned job accounts for
    run: Run | None
    state: str
    reason: str = ""
    elsewhere: bool = False  # the run is a completed run with the same signature outside this sweep

    @property
    def overrides(self) -> list[str]:
        if self.job is not None:
            return self.job.overrides
        return list(self.run.record.get("overrides") or []) if self.run else []

    @property
    def signature(self) -> str | None:
        """The planned job's, else (no plan, or one that knows it only once the job runs) its run's."""
        planned = self.job.signature if self.job else None
        return planned or (self.run.signature if self.run else None)


@dataclass
class Sweep:
    directory: Path
    plan: Plan | None
    notes: list[str]
    jobs: list[JobStatus]
    reused: dict[str, str]  # signature -> directory of a completed run outside the sweep, kept in sweep.json
    samplings: bool = False  # a sweep of ibq-sample: its jobs are samplings, scored by gFID and IS

    @property
    def group(self) -> str:
        """The W&B group of its runs: as the runs recorded it, else as a job of this directory would name it."""
        for status in self.jobs:
            if status.run is not None and not status.elsewhere:
                group = (status.run.record.get("wandb") or {}).get("group")
                if group:
                    return group
        return sweep_group(self.directory)

    def counts(self) -> dict[str, int]:
        counts = {state: 0 for state in STATE_ORDER}
        for status in self.jobs:
            counts[status.state] = counts.get(status.state, 0) + 1
        return {state: n for state, n in counts.items() if n}

    def completed_runs(self) -> list[Run]:
        return [s.run for s in self.jobs if s.state == "done" and s.run is not None]

    def save_ledger(self) -> None:
        """Keep the plan next to the runs: a relaunch through Hydra rewrites multirun.yaml."""
        if self.plan is None:
            return
        write_json(
            self.directory / LEDGER_FILE,
            {"plan": self.plan.to_dict(), "reused": self.reused, "written": timestamp()},
        )


class OtherAppSweep(UserError):
    """A sweep of an app whose jobs leave no training runs (ibq-tokenize, ibq-sample, ibq-eval)."""

    def __init__(self, directory: Path, config_name: str):
        super().__init__(f"{directory} is a sweep of {APPS.get(config_name, config_name)}, whose jobs leave no training runs: "
                         f"ibq-sweep status lists its jobs; table, plot and report take sweeps of ibq-train, ibq-train-ar and "
                         f"ibq-sample, retry those of ibq-train and ibq-train-ar")
        self.directory = directory
        self.config_name = config_name


def plan_from_multirun(directory: Path) -> Plan:
    recorded = OmegaConf.load(directory / "multirun.yaml")
    hydra = recorded.hydra
    if str(hydra.job.config_name) not in KINDS:
        raise OtherAppSweep(directory, str(hydra.job.config_name))
    arguments = given_overrides(hydra, "hydra") + given_overrides(hydra)
    params = {str(k): str(v) for k, v in (hydra.sweeper.params or {}).items()}
    plan = expand(arguments, config_name=str(hydra.job.config_name), sweeper_params=params)
    plan.sweep_dir = str(directory)
    return plan


def jobs_app(directory: Path) -> str | None:
    """The app whose jobs a sweep folder holds, from a job's own Hydra record: a search sweeper (Optuna)
    writes no multirun.yaml."""
    recorded = next(directory.rglob(".hydra/hydra.yaml"), None)
    return None if recorded is None else str(OmegaConf.load(recorded).hydra.job.config_name)


def search_outcome(directories: list[Path]) -> list[str]:
    """What a search sweeper found (Optuna's optimization_results.yaml) in each folder: its best trial, or the
    trials of its Pareto front, each as its objectives' values at its parameters; nothing for a grid. A stored
    study (hydra.sweeper.storage) adds what it holds now, every launch's trials included, once for the folders
    of its launches given together."""
    lines: list[str] = []
    studies: dict[tuple[str, str], tuple[list[str], int]] = {}  # (storage, name) -> (objective names, trials in these folders)
    for directory in directories:
        found = directory / "optimization_results.yaml"
        if not found.is_file():
            continue
        found = OmegaConf.to_container(OmegaConf.load(found))
        jobs = list(directory.rglob(".hydra/config.yaml"))
        names = list(OmegaConf.load(jobs[0]).get("objectives") or []) if jobs else []
        where = f"{directory}: " if len(directories) > 1 else ""
        if "best_params" in found:
            lines.append(f"{where}search best: {trial_text(names, [found['best_value']], found['best_params'])}")
        else:
            lines += [f"{where}search Pareto front: {trial_text(names, solution['values'], solution['params'])}"
                      for solution in found.get("solutions") or []]
        if jobs and (address := study_address(jobs[0].parent / "hydra.yaml")) is not None:
            studies[address] = (names, studies.get(address, (names, 0))[1] + len(jobs))
    here = "this folder" if len(directories) == 1 else "these folders"
    return lines + [stored_study(storage, name, names, f"{trials_here} of them in {here}")
                    for (storage, name), (names, trials_here) in studies.items()]


def trial_text(names: list[str], values: list[float], params: dict) -> str:
    """A trial as its objectives' values at its parameters."""
    scores = ", ".join(f"{names[i] if i < len(names) else f'objective {i + 1}'} {value:.4g}" for i, value in enumerate(values))
    return f"{scores} at " + " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in params.items())


def study_address(job_hydra: Path) -> tuple[str, str] | None:
    """(storage URL, study name) of a job's stored study, a relative SQLite path made absolute as the launch
    opened it; None for a study kept in memory."""
    if not job_hydra.is_file():
        return None
    hydra = OmegaConf.load(job_hydra).hydra
    storage, name = (OmegaConf.select(hydra, f"sweeper.{key}") for key in ("storage", "study_name"))
    if storage is None or name is None:
        return None
    file = sqlite_file(storage, hydra.runtime.cwd)
    return (f"sqlite:///{file}" if file is not None else str(storage)), str(name)


def stored_study(storage: str, name: str, names: list[str], trials_here: str) -> str:
    """A stored study's trials and best ones as it holds them now (later launches may have added to it since a
    folder's optimization_results.yaml)."""
    where = f"search study: {name} in {storage}"
    file = sqlite_file(storage)
    if file is not None and not file.is_file():  # opening it would make an empty one
        return f"{where}: cannot be read here (no such file)"
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=name, storage=storage)
        best = study.best_trials
    except Exception as error:  # moved, a server not reached from here, or no trial completed yet
        return f"{where}: cannot be read here ({type(error).__name__})"
    return (f"{where}: {len(study.trials)} trials, {trials_here}{trial_states(study.trials)}; best of all: "
            + "; ".join(trial_text(names, t.values, t.params) for t in best))


def trial_states(trials: list) -> str:
    """Where not every trial completed, how many are in which state ('; 4 complete, 2 running (…)'): a launch
    that was interrupted leaves its trials running in the study, where the sampler leaves them out."""
    states = Counter(trial.state.name.lower() for trial in trials)
    if set(states) <= {"complete"}:
        return ""
    return "; " + ", ".join(f"{n} {state}" + (" (a launch still at work, or one interrupted)" if state == "running" else "")
                            for state, n in states.items())


def read_ledger(directory: Path) -> tuple[Plan | None, dict[str, str], list[str]]:
    ledger = read_json(directory / LEDGER_FILE)
    if ledger is not None:
        return Plan.from_dict(ledger["plan"]), dict(ledger.get("reused") or {}), []
    if (directory / "multirun.yaml").exists():
        try:
            return plan_from_multirun(directory), {}, []
        except OtherAppSweep:
            raise
        except UserError as error:
            return None, {}, [f"the sweep's jobs cannot be expanded again from multirun.yaml ({error}); listing its runs only"]
    return None, {}, []


def last_update(run: Run) -> float | None:
    paths = [run.path / name for name in ("run.json", "metrics.jsonl", "checkpoints/last.pt")] if run.path else []
    times = [p.stat().st_mtime for p in paths if p.exists()]
    return max(times) if times else None


def age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_state(run: Run) -> tuple[str, str]:
    if run.status == "completed":
        return ("done", "") if run.results is not None else ("failed", "completed but wrote no results.json")
    if run.status in ("failed", "preempted"):
        return run.status, run.error or ""
    if run.status == "running":
        updated = last_update(run)
        since = f"last update {age(time.time() - updated)} ago" if updated else "no update yet"
        alive = run_process_alive(run.record)
        if alive is False:
            return "interrupted", f"its process is gone; {since}"
        if alive is None:
            return "running", f"on {run.record.get('host')}, not checked from here; {since}"
        return "running", since
    return "failed", f"unknown status {run.status!r} in run.json"


def load_sweep(directory: Path, search: list[Path] | None = None) -> Sweep:
    """`search`: folders where completed runs of the same signatures count as done (e.g. outputs/)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory")
    found = {path: load_run(path) for path in run_dirs(directory)}
    runs = [run for run in found.values() if run is not None]
    unreadable = {path.relative_to(directory).as_posix(): path for path, run in found.items() if run is None}
    plan, reused, notes = read_ledger(directory)
    notes += [f"{path / 'run.json'} cannot be read ({load_json(path / 'run.json')[1]}): its run is not counted"
              for path in unreadable.values()]
    if not runs and plan is None:
        app = jobs_app(directory)
        if app is not None and app not in KINDS:
            raise OtherAppSweep(directory, app)
        runs_text = (f"no readable run ({len(unreadable)} run.json file(s) cannot be read, first "
                     f"{next(iter(unreadable.values())) / 'run.json'})") if unreadable else "no runs (no run.json below it)"
        raise UserError(f"{directory} holds {runs_text} and no sweep plan (sweep.json or multirun.yaml)")

    by_dir = {run.path.relative_to(directory).as_posix(): run for run in runs}
    by_signature = {run.signature: run for run in runs if run.signature}
    elsewhere = completed_runs(search or []) if plan else {}
    matched: set[str] = set()
    statuses: list[JobStatus] = []
    for job in plan.jobs if plan else []:
        run = by_dir.get(job.subdir) or by_signature.get(job.signature)
        if run is not None:
            matched.add(run.location)
            state, reason = run_state(run)
            if run.signature and job.signature and run.signature != job.signature:
                reason = "; ".join(filter(None, [reason, f"the config changed since launch (signature {run.signature}, now {job.signature})"]))
            statuses.append(JobStatus(job, run, state, reason))
            continue
        other = reused.get(job.signature) or (str(elsewhere[job.signature]) if job.signature in elsewhere else None)
        other_run = load_run(Path(other)) if other else None
        if other_run is not None and other_run.completed:
            reused[job.signature] = other
            statuses.append(JobStatus(job, other_run, "done", f"completed in {other}", elsewhere=True))
        elif job.subdir in unreadable:
            statuses.append(JobStatus(job, None, "missing", "its run.json cannot be read (see the note)"))
        else:
            statuses.append(JobStatus(job, None, "missing", "not started"))
    for run in runs:
        if run.location not in matched:
            state, reason = run_state(run)
            if plan is not None:
                reason = "; ".join(filter(None, [reason, "not a job of the sweep's plan"]))
            statuses.append(JobStatus(None, run, state, reason))

    if any(s.state == "running" for s in statuses):
        for status in statuses:
            if status.state == "missing":
                status.state, status.reason = "pending", "not started yet (the sweep is still running)"
    return Sweep(directory, plan, notes, statuses, reused)


def load_sampling_sweep(directory: Path, named: bool = True) -> Sweep:
    """A sweep of ibq-sample (CFG scales, temperatures or seeds, over one AR run or several): one job per
    sampling folder, with its gFID and IS where they were scored, and the jobs that failed as they recorded it.
    `named`: the AR runs named by their paths below the folder they share (name_ar_runs), else absolute."""
    directory = Path(directory)
    records = job_records(directory)
    overrides = {Path(r["output_dir"]).resolve(): r["overrides"] for r in records if "output_dir" in r}
    statuses = []
    samplings = [run for run in map(load_sampling, sampling_dirs(directory)) if run is not None]
    for run in name_ar_runs(samplings) if named else samplings:
        run.record["overrides"] = overrides.get(run.path.resolve(), [])
        statuses.append(JobStatus(None, run, "done", "" if run.results else "not scored (metrics.fid=false, or one part of several)"))
    for record in records:
        if record["status"] != "done":
            failed = Run(name=f"job {record['num']}", location=record.get("output_dir", str(directory)), status="failed", signature=None,
                         choices={}, config={}, results=None, record={"overrides": record["overrides"]})
            statuses.append(JobStatus(None, failed, "failed", record["reason"]))
    return Sweep(directory, None, [], statuses, {}, samplings=True)


def load_compared_sweep(directory: Path, search: list[Path] | None = None, named: bool = True) -> Sweep:
    """A folder whose runs a table, plot or report compares: a sweep of ibq-train or ibq-train-ar, or one of
    ibq-sample with at least one scored sampling."""
    try:
        return load_sweep(directory, search)
    except OtherAppSweep as other:
        if other.config_name != "sample":
            raise
        sweep = load_sampling_sweep(other.directory, named)
    if not any(s.run.completed for s in sweep.jobs):
        found = f"{len(sweep.jobs)} sampling(s), none scored" if sweep.jobs else "no finished sampling yet"
        raise UserError(f"{sweep.directory} holds {found}: a sampling is scored where metrics.fid is on and parts=1, the parts of "
                        f"one sampling together by ibq-eval samples=<their sweep folder> run_dir=<AR run>; see `ibq-sweep status {sweep.directory}`")
    return sweep


def runs_kind(sweep: Sweep) -> str | None:
    """What a folder's runs are, as the app that made them (None: training runs whose record does not say)."""
    if sweep.samplings:
        return "samplings of ibq-sample"
    made_by = {APPS[config] for config, kind in KINDS.items() for s in sweep.jobs if s.run is not None and s.run.record.get("kind") == kind}
    return f"runs of {made_by.pop()}" if len(made_by) == 1 else None


@dataclass
class Comparison:
    """The runs of one sweep folder or of several compared together (a grid and the seeds added to it later,
    the launches of one search, the sweeps of two quantizers), each run once."""
    sweeps: list[Sweep]
    runs: list[Run]

    @property
    def repeats(self) -> int:
        """Completed runs of a configuration that a run listed before them completed too (same signature): a table
        counts the first one only."""
        signatures = [run.signature for run in self.runs if run.completed and run.signature]
        return len(signatures) - len(set(signatures))

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(sweep.group for sweep in self.sweeps))

    @property
    def samplings(self) -> bool:
        return self.sweeps[0].samplings


def analysis_group(groups: list[str]) -> str:
    """The W&B group (and folder name) of an analysis of runs: their sweep's group, or for several sweeps a name
    of them all (the same sweeps in any order, the same name)."""
    if len(groups) == 1:
        return groups[0]
    digest = hashlib.sha256("\n".join(sorted(groups)).encode()).hexdigest()[:6]
    return f"compare-{len(groups)}-sweeps-{digest}"


def load_comparison(directories: list[Path], search: list[Path] | None = None) -> Comparison:
    """`directories` in the order given: where two hold the same configuration, the first one's run counts."""
    several = len(directories) > 1
    sweeps = [load_compared_sweep(Path(directory), search, named=not several) for directory in directories]
    kinds = [runs_kind(sweep) for sweep in sweeps]
    for i, (sweep, kind) in enumerate(zip(sweeps, kinds)):
        for earlier, earlier_kind in zip(sweeps[:i], kinds[:i]):
            if sweep.samplings != earlier.samplings or (kind and earlier_kind and kind != earlier_kind):
                raise UserError(f"{sweep.directory} holds {kind or 'training runs'} and {earlier.directory} {earlier_kind or 'training runs'}: "
                                f"a table, plot or report compares runs of one app; give their folders in separate commands")
    runs, paths = [], set()
    for sweep in sweeps:
        for status in sweep.jobs:
            run = status.run
            if run is None or (run.path is not None and run.path.resolve() in paths):  # a run two folders list (a sweep reusing another's)
                continue
            if run.path is not None:
                paths.add(run.path.resolve())
            runs.append(run)
    if several and sweeps[0].samplings:
        name_ar_runs(runs)
    if not runs:
        where = " or ".join(str(sweep.directory) for sweep in sweeps)
        raise UserError(f"{where} holds no runs yet (no run.json below it); see `ibq-sweep status {sweeps[0].directory}`")
    return Comparison(sweeps, runs)


# What a sampling takes from its AR run unless it is given: shown only where it tells apart samplings of one run.
OF_THE_AR_RUN = ("step", "classes", "samples", "gfid/reference", "gfid/reference_samples")


def name_ar_runs(samplings: list[Run]) -> list[Run]:
    """The samplings of several AR runs name each by its path below the folder they share, and keep the
    settings each takes from its run (OF_THE_AR_RUN) only where samplings of one run differ in them."""
    paths = {run.config["ar_run"] for run in samplings}
    if len(paths) < 2:
        return samplings
    shared = os.path.commonpath(sorted(paths))
    for key in OF_THE_AR_RUN:
        values = {(run.config["ar_run"], repr(run.config.get(key))) for run in samplings}
        if len(values) == len(paths):  # one value per run
            for run in samplings:
                run.config.pop(key, None)
    for run in samplings:
        run.config["ar_run"] = os.path.relpath(run.config["ar_run"], shared)
    return samplings


def progress(status: JobStatus) -> str:
    """'120/300': the last step in metrics.jsonl over the steps the run takes (train.steps, or the
    total_steps of its run.json: a stage-II run's ar_train.steps or epochs)."""
    run = status.run
    if run is None or run.path is None:
        return ""
    total = run.record.get("total_steps", run.config.get("train.steps"))
    if status.state == "done":
        step = (run.results or {}).get("step", total)
    else:
        step = last_logged_step(run.path / "metrics.jsonl")
    return f"{step}/{total}" if step is not None and total is not None else ""


def last_logged_step(path: Path) -> int | None:
    if not path.exists():
        return None
    with path.open("rb") as file:
        file.seek(max(0, path.stat().st_size - 8192))
        lines = [line for line in file.read().splitlines() if line.strip()]
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None
