"""Shared by the Hydra entry points: one-line errors, run-directory bookkeeping."""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import traceback
from contextlib import nullcontext
from functools import wraps
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationKeyError, InterpolationToMissingValueError, MissingMandatoryValue, OmegaConfBaseException

from ibq.cli.callbacks import JobFailed, SweepWatch
from ibq.cli.checks import BATCH_SECTIONS, check_job
from ibq.config import fail, given_overrides, missing_config_line, one_line, reader_gone, shell_override, unparsable
from ibq.engine.ranks import detect_ranks
from ibq.errors import Terminated, TrainingDiverged, UserError, interruption, unset_key
from ibq.runs.lock import RunLock
from ibq.runs.record import RunRecord, run_choices, sweep_group
from ibq.runs.wandb_mirror import offline_folders

log = logging.getLogger("ibq")


def fid_detail(results: dict, metric: str, switch: str) -> str:
    """What an FID figure was measured on, or the key that turned it off (`switch`, e.g. eval.rfid=false)."""
    if results[f"{metric}/network"] is None:
        return f"(not computed: {switch})"
    return f"({results[f'{metric}/samples']} samples, {results[f'{metric}/network']})"


def failure_line(error: Exception) -> str:
    """One line out of submitit's multi-line report of a job that failed or left no result."""
    text = str(error)
    # Both reports name a file of the job's folder: <job id>_<task>_log.err or <job id>_<task>_result.pkl.
    path = re.search(r"(\S+)_(\d+)_(?:log\.err|result\.pkl)", text)
    job = f"job {Path(path.group(1)).name} (task {path.group(2)})" if path else "a job"
    trace = text.split("----------------------")
    raised = [line.strip() for line in trace[1].splitlines() if line.strip()] if "with trace:" in text and len(trace) > 2 else []
    told = [line.removeprefix("error: ") for line in text.splitlines() if line.startswith("error: ")]  # guarded()'s line
    state = re.search(r"\(state: ([^)]*)\)", text)
    if raised:
        how = f"raised {raised[-1]}"
    elif told:
        how = f"failed: {told[-1]}"
    else:
        how = f"ended {state.group(1) if state else 'early'} without a result"
    log = f"; its log: {path.group(1)}_{path.group(2)}_log.err" if path else ""
    return f"{job} {how}{log} (the sweep's other jobs keep running: see sacct or squeue)"


def raised_in_a_job(error: Exception) -> bool:
    """Hydra's sweeper re-raises a job's own exception when it reads the job's return value."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and frames[-1].name == "return_value"


def entry_point(hydra_main):
    """Console script of a Hydra main: Hydra's own composition and checks (ConfigChecks); what they
    refuse, and a failed cluster job, is told in one line instead of Hydra's report."""

    @wraps(hydra_main)
    def cli() -> None:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        # Hydra prints errors over several lines unless it lets them through to be told here in one.
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            try:
                hydra_main()
            finally:  # the sweep's progress bar ends on its own line before any error is told
                SweepWatch.stop_all()
        except UserError as error:
            fail(str(error))
        except MissingConfigException as error:
            fail(missing_config_line(error))
        except OverrideParseException as error:
            fail(str(unparsable(error.override, error)))
        except ConfigCompositionException as error:
            fail(one_line(f"{error}\n{error.__cause__ or ''}"))
        except (FailedJobError, UncompletedJobError) as error:
            fail(failure_line(error), 1)
        except BrokenPipeError:  # `ibq-train-ar dry_run=true | head`; a run's record says how it ended
            reader_gone(141)  # as a shell reports a writer stopped by SIGPIPE
        except InterpolationKeyError as error:
            # Hydra shows its own node without the job's keys, which the cluster presets and run folders refer to.
            missing = re.search(r"Interpolation key '([^']+)' not found", str(error))
            shows_hydra = any(flag in ("--cfg", "-c") and shown == "hydra" for flag, shown in zip(sys.argv, sys.argv[1:]))
            if not (shows_hydra and "--resolve" in sys.argv and missing):
                raise
            fail(f"--cfg hydra --resolve: Hydra's config refers to {missing.group(1)}, a key of the job's config, which "
                 f"--cfg hydra leaves out; --cfg all --resolve shows both resolved")
        except Exception as error:
            if not raised_in_a_job(error):
                raise
            fail(f"a job of the sweep failed with {type(error).__name__}: {one_line(str(error))} (its log: .submitit/ in the sweep folder)", 1)

    return cli


def missing_value(error: OmegaConfBaseException) -> str:
    """The line for a ??? key that the command line left unset (directly or through an interpolation)."""
    named = re.search(r"Missing mandatory value: ([\w.\[\]]+)", str(error))
    return str(unset_key(named.group(1) if named else error.full_key))


def error_line(error: Exception) -> tuple[str, int] | None:
    """The one line and exit code for an error the user can act on; None for anything else (a bug)."""
    if isinstance(error, TrainingDiverged):
        return str(error), 3
    if isinstance(error, (UserError, FileNotFoundError)):
        return str(error), 2
    if isinstance(error, (MissingMandatoryValue, InterpolationToMissingValueError)):
        return missing_value(error), 2
    return None


def remove_empty_folders(run_dir: Path) -> None:
    """`run_dir` if empty, then each empty folder above it down to two levels below the working directory
    (never the working directory itself, ibq-eval's hydra.run.dir)."""
    cwd, folder = Path.cwd().resolve(), run_dir.resolve()
    while folder.is_dir() and not any(folder.iterdir()) and not cwd.is_relative_to(folder):
        folder.rmdir()
        folder = folder.parent
        if not folder.is_relative_to(cwd) or len(folder.relative_to(cwd).parts) < 2:
            return


def guarded(task):
    """Runs a Hydra task once its config passes the job's checks (checks.check_job); a user error or
    divergence exits non-zero with one line, Ctrl-C or SIGTERM with one line (exit 130 or 143). In a
    sweep a failed job returns a JobFailed instead, so that the next job starts (a bug
    also prints its traceback). Hydra creates the run directory before the task starts: when the task
    leaves it empty (a rejected config, a dry run), it is removed again, with the empty folders above it
    that lie deeper than one level below the working directory (outputs/tokens/<run>/ of a refused
    ibq-tokenize; outputs/ itself stays)."""

    @wraps(task)
    def wrapper(cfg) -> JobFailed | list[float] | float | None:
        hydra = HydraConfig.get()
        run_dir = Path(hydra.runtime.output_dir)
        in_sweep = hydra.mode == RunMode.MULTIRUN
        try:
            check_job(cfg, hydra.job.config_name, run_dir=run_dir)
            return task(cfg, run_dir)  # what a search sweeper optimises (objective_values), else None
        except BrokenPipeError:  # before Hydra reports it as the job's failure
            reader_gone(141)
        except KeyboardInterrupt as interrupt:
            terminated = isinstance(interrupt, Terminated)
            again = "resume from the last checkpoint" if hydra.job.config_name in BATCH_SECTIONS else "start it again"  # training or not
            fail(f"{interruption(interrupt)}: run the same command again to {again}", 143 if terminated else 130)
        except Exception as error:
            told = error_line(error)
            if not in_sweep:
                if told is None:
                    raise
                fail(*told)
            if told is None:
                log.exception("the job failed")
                return JobFailed(f"{type(error).__name__}: {one_line(str(error))}")
            print(f"error: {told[0]}", file=sys.stderr)
            return JobFailed(told[0])
        finally:
            if detect_ranks().is_main:
                remove_empty_folders(run_dir)

    return wrapper


def hydra_context(cfg) -> tuple[dict, list[str], str | None]:
    """The run's choices (runs.record.run_choices), the job's overrides, and the sweep's W&B group in multirun mode."""
    hydra = HydraConfig.get()
    choices = run_choices(cfg, hydra.runtime.choices)
    group = sweep_group(hydra.sweep.dir) if hydra.mode == RunMode.MULTIRUN else None
    return choices, given_overrides(hydra), group


def choices_text(choices: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(choices.items()) if value is not None)


def objective_values(cfg, results: dict) -> list[float] | float | None:
    """The job's `objectives` (keys of its results.json), which a search sweeper's trial returns to it
    (sweeps/lr_entropy_search.yaml; +objectives=[gfid] over ibq-sample's settings): a list for a study of
    several, the number itself for one (what Optuna's sweeper takes for one direction); None without objectives."""
    names = list(cfg.get("objectives") or [])
    missing = [name for name in names if results.get(name) is None]
    if missing:
        measured = sorted(key for key, value in results.items() if isinstance(value, (int, float)) and not isinstance(value, bool))
        raise UserError(f"objectives: {', '.join(missing)} not measured by this run (a metric switched off, or whose network "
                        f"weights are missing, is left out); its numeric results: {', '.join(measured)}")
    values = [float(results[name]) for name in names]
    return values[0] if len(values) == 1 else values or None


def parent_lines(training) -> list[str]:
    """The summary's line for a fine-tuning run (init_from): the run it started from, and whether the class
    embeddings started anew (init_from_classes=fresh)."""
    parent = training.parent
    if parent is None:
        return []
    fresh = parent.get("fresh_classes")
    anew = f"; class embeddings new for its {fresh['run']} classes (the parent's {fresh['parent']})" if fresh else ""
    return [f"fine-tuned from       {parent['run_dir']} (step {parent['step']}, signature {parent['signature']}){anew}"]


def kept_checkpoint_lines(run_dir: Path, key: str, reader: str, does: str) -> list[str]:
    """The summary's line for the checkpoints the run kept along the way (`key`, its keep_every), and how the
    app `reader` reads one (`does`: what it does with it)."""
    from ibq.engine.checkpoint import kept_checkpoints  # here, not at import: its module loads torch

    kept = list(kept_checkpoints(run_dir / "checkpoints").values())
    if not kept:
        return []
    return [f"kept checkpoints      {len(kept)} ({key}): {kept[0].name} … {kept[-1].name}; "
            f"{reader} {shell_override('run_dir', run_dir)} step=<N> {does}"]


def run_training(cfg, run_dir: Path, app: str, training_class, dry_run, summary_lines) -> list[float] | float | None:
    """What both training apps do: a dry run reports sizes; otherwise build and check everything
    (nothing written yet), keep Hydra's files, train, let rank 0 print the summary and return the
    run's objective values to a search sweeper."""
    choices, overrides, group = hydra_context(cfg)
    if cfg.dry_run:
        print("choices: " + choices_text(choices))
        dry_run(cfg)
        return
    # One writer per run directory: the lock is held from the checks (run.json, the checkpoint) to the end.
    with RunLock(run_dir) if detect_ranks().is_main else nullcontext():
        training = training_class(cfg, run_dir)
        if training.ranks.is_main:
            save_hydra_files(cfg, run_dir)
        results = training.run(choices, overrides, group)
    if not training.ranks.is_main:
        return
    lines = summary_lines(training, results, run_dir)
    wandb = RunRecord(run_dir).data.get("wandb") or {}
    if wandb.get("dir"):
        folders = offline_folders(run_dir, wandb.get("id")) if wandb["mode"] == "offline" else []
        upload = f"  (upload: wandb sync {' '.join(shlex.quote(str(folder)) for folder in folders)})" if folders else ""
        lines.append(f"W&B ({wandb['mode']})         {wandb['dir']}{upload}")
    print(f"\n{app}: {training.total_steps} steps done ({choices_text(choices)})")
    for line in lines:
        print("  " + line)
    return objective_values(cfg, results)


def save_hydra_files(cfg, run_dir: Path) -> None:
    """What Hydra would write to .hydra/, written only once the config has been checked."""
    hydra = HydraConfig.get()
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hydra)}), out / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(given_overrides(hydra)), out / "overrides.yaml")
