"""Shared by the Hydra entry points: config location, one-line errors, run-directory bookkeeping."""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import subprocess
import sys
import traceback
from contextlib import nullcontext
from functools import lru_cache, wraps
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue, OmegaConfBaseException

from ibq.cli.callbacks import JobFailed
from ibq.config import CONF_DIR, check_group_choices, one_line, override_args, parse, quote_numeric_choices
from ibq.engine.distributed import check_deepspeed, detect_ranks, plan_batches
from ibq.errors import Terminated, TrainingDiverged, UserError, check_positive_int, interruption, unset_key
from ibq.runs.lock import RunLock
from ibq.runs.record import RunRecord, group_choices, run_dirname, sweep_group
from ibq.runs.wandb_mirror import offline_folders

log = logging.getLogger("ibq")

OmegaConf.register_new_resolver("ibq.dirname", run_dirname, replace=True)


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def compose_job(overrides: list[str], config_name: str):
    """One job's config, composed up front so that a bad key or value is one line, not Hydra's report."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=config_name):
            return compose(config_name, overrides=overrides, return_hydra_config=True)
    except Exception as error:  # Hydra raises several unrelated types for bad overrides
        raise UserError(one_line(str(error))) from None


# -- where the jobs run: checked for every job of a sweep before anything is submitted -----------------
MULTIRUN_FLAGS = ("-m", "--multirun")
SUBMITIT_LAUNCHERS = ("submitit_slurm", "submitit_local")
# Swept overrides under these roots can change a job's resources or batch; the others (quantizer,
# codebook_size, ...) cannot, so the checks compose one job per combination of the former only.
PLACEMENT_ROOTS = ("cluster", "deepspeed", "train", "ar_train", "model_scale", "experiment", "sweep", "hydra")
# The config node with each training app's batch and precision keys.
BATCH_SECTIONS = {"train": "train", "train_ar": "ar_train"}


def placement_variants(argv: list[str]) -> list[list[str]]:
    fixed, swept = [], []
    for arg in override_args(argv):
        override = parse(arg)
        if not override.is_sweep_override():
            fixed.append(arg)
            continue
        prefix, values = arg.split("=", 1)[0], list(override.sweep_string_iterator())
        if override.key_or_group.split(".")[0].split("/")[0] in PLACEMENT_ROOTS:
            swept.append([f"{prefix}={value}" for value in values])
        else:
            fixed.append(f"{prefix}={values[0]}")
    return [fixed + list(combination) for combination in itertools.product(*swept)]


def world_size(cluster) -> int:
    """Ranks per job: the preset's nodes x tasks_per_node, or torchrun's WORLD_SIZE for cluster=local."""
    if cluster.launcher not in SUBMITIT_LAUNCHERS:
        return detect_ranks().world_size
    nodes = check_positive_int("cluster.nodes", cluster.nodes)
    return nodes * check_positive_int("cluster.tasks_per_node", cluster.tasks_per_node)


@lru_cache(maxsize=None)
def slurm_query(*args: str) -> list[str]:
    try:
        result = subprocess.run(["sinfo", "-h", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise UserError(f"sinfo failed ({error}): is the Slurm controller up? (`make slurm-status`)") from None
    if result.returncode != 0:
        raise UserError(f"sinfo failed: {one_line(result.stderr) or 'exit ' + str(result.returncode)}; is the Slurm controller up?")
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def partition_gpus(partition: str | None) -> int:
    """The most GPUs one node of the partition has, from its GRES (gpu:8, gpu:a100:4(S:0-1), ...)."""
    most = 0
    for gres in slurm_query(*(["-p", partition] if partition else []), "-o", "%G"):
        for item in gres.split(","):
            fields = item.split("(")[0].split(":")
            if fields[0] == "gpu" and fields[-1].isdigit():
                most = max(most, int(fields[-1]))
    return most


def check_cluster(cluster) -> None:
    gpus = cluster.gpus_per_node or 0
    if gpus > cluster.max_gpus_per_node:
        raise UserError(
            f"cluster.gpus_per_node={gpus} is more than cluster={cluster.name} allows "
            f"(max_gpus_per_node={cluster.max_gpus_per_node}, the size of its nodes)"
        )
    if gpus and cluster.tasks_per_node != gpus:
        raise UserError(
            f"cluster.tasks_per_node={cluster.tasks_per_node} with cluster.gpus_per_node={gpus}: each rank takes one GPU, "
            f"so set cluster.tasks_per_node={gpus}"
        )
    if cluster.launcher == "submitit_local":
        if cluster.nodes != 1:
            raise UserError(f"cluster.nodes={cluster.nodes}: cluster={cluster.name} runs on this machine only (nodes=1)")
        return
    if shutil.which("sbatch") is None:
        raise UserError(
            f"cluster={cluster.name} needs Slurm's sbatch, which is not on PATH here: submit from a Slurm login node, "
            f"or start the local cluster with `make slurm-up`"
        )
    if cluster.partition is not None:
        partitions = [name.rstrip("*") for name in slurm_query("-o", "%R")]
        if cluster.partition not in partitions:
            raise UserError(f"cluster.partition={cluster.partition} does not exist on this Slurm cluster; partitions: {', '.join(partitions) or 'none'}")
    if gpus and partition_gpus(cluster.partition) < gpus:
        where = f"partition {cluster.partition}" if cluster.partition else "the default partition"
        raise UserError(f"cluster.gpus_per_node={gpus}, but the nodes of {where} have at most {partition_gpus(cluster.partition)} GPUs")


def check_placement(cfg, section: str) -> None:
    """The job's cluster, batch layout (cfg[section]) and DeepSpeed options."""
    cluster = cfg.get("cluster")
    if cluster is None or section not in cfg:
        return
    try:
        ranks = world_size(cluster)
        if cluster.launcher in SUBMITIT_LAUNCHERS:
            check_cluster(cluster)
        batch = cfg[section]
        plan_batches(batch.batch_size, batch.micro_batch_size, ranks, section=section)
        if "deepspeed" in cfg:
            check_deepspeed(OmegaConf.to_container(cfg.deepspeed, resolve=True), batch.precision, section=section)
    except OmegaConfBaseException as error:
        raise UserError(one_line(str(error))) from None


def prepare_submission(argv: list[str], config_name: str) -> tuple[list[str], bool]:
    """Checks where every job runs. For a submitit cluster (returned as True), makes the run a sweep
    (Hydra only hands -m runs to a launcher) and sets the requeue signal that submitit asks Slurm to send."""
    variants = placement_variants(argv)
    configs = [compose_job(overrides, config_name) for overrides in variants]
    section = BATCH_SECTIONS.get(config_name)
    for cfg in configs:
        if section is not None:
            check_placement(cfg, section)
    cluster = configs[0].get("cluster")
    if cluster is None or cluster.launcher not in SUBMITIT_LAUNCHERS or configs[0].get("dry_run"):
        return argv, False
    if cluster.requeue_signal:
        os.environ["SUBMITIT_PREEMPT_SIGNAL"] = str(cluster.requeue_signal).upper().removeprefix("SIG")
    return (argv if any(flag in argv for flag in MULTIRUN_FLAGS) else ["--multirun", *argv]), True


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


def entry_point(hydra_main, config_name: str):
    """Console script around a Hydra main: checks the overrides (and where the jobs will run) first,
    prints user errors, and a failed cluster job, as one line."""

    @wraps(hydra_main)
    def cli() -> None:
        try:
            check_group_choices(sys.argv[1:], CONF_DIR)
            sys.argv[1:] = quote_numeric_choices(sys.argv[1:], CONF_DIR)
            sys.argv[1:], submitting = prepare_submission(sys.argv[1:], config_name)
        except UserError as error:
            fail(str(error))
        if not submitting:
            hydra_main()
            return
        from submitit.core.utils import FailedJobError, UncompletedJobError

        # Hydra prints a launcher's exception as a stack trace; let it through to be told in one line.
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            hydra_main()
        except (FailedJobError, UncompletedJobError) as error:
            fail(failure_line(error), 1)
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
    """`run_dir` if empty, then each empty folder above it down to two levels below the working directory."""
    cwd, folder = Path.cwd().resolve(), run_dir.resolve()
    while folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
        if not folder.is_relative_to(cwd) or len(folder.relative_to(cwd).parts) < 2:
            return


def guarded(task):
    """Runs a Hydra task; a user error or divergence exits non-zero with one line, Ctrl-C with one line
    (exit 130). In a sweep a failed job returns a JobFailed instead, so that the next job starts (a bug
    also prints its traceback). Hydra creates the run directory before the task starts: when the task
    leaves it empty (a rejected config, a dry run), it is removed again, with the empty folders above it
    that lie deeper than one level below the working directory (outputs/tokens/<run>/ of a refused
    ibq-tokenize; outputs/ itself stays)."""

    @wraps(task)
    def wrapper(cfg) -> JobFailed | None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
        try:
            task(cfg, run_dir)
        except KeyboardInterrupt as interrupt:
            terminated = isinstance(interrupt, Terminated)
            fail(f"{interruption(interrupt)}: run the same command again to resume from the last checkpoint", 143 if terminated else 130)
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
        return None

    return wrapper


def hydra_context() -> tuple[dict, list[str], str | None]:
    """Config-group choices, the job's overrides, and the sweep's W&B group in multirun mode."""
    hydra = HydraConfig.get()
    choices = group_choices(hydra.runtime.choices)
    group = sweep_group(hydra.sweep.dir) if hydra.mode == RunMode.MULTIRUN else None
    return choices, list(hydra.overrides.task), group


def choices_text(choices: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(choices.items()) if value is not None)


def run_training(cfg, run_dir: Path, app: str, training_class, dry_run, summary_lines) -> None:
    """What both training apps do: a dry run reports sizes; otherwise build and check everything
    (nothing written yet), keep Hydra's files, train, and let rank 0 print the summary."""
    choices, overrides, group = hydra_context()
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
        upload = f"  (upload: wandb sync {' '.join(map(str, folders))})" if folders else ""
        lines.append(f"W&B ({wandb['mode']})         {wandb['dir']}{upload}")
    print(f"\n{app}: {training.total_steps} steps done ({choices_text(choices)})")
    for line in lines:
        print("  " + line)


def save_hydra_files(cfg, run_dir: Path) -> None:
    """What Hydra would write to .hydra/, written only once the config has been checked."""
    hydra = HydraConfig.get()
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hydra)}), out / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hydra.overrides.task)), out / "overrides.yaml")
