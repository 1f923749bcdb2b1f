"""Checks inside Hydra's flow, after composition and before anything is written or submitted: the
values of the config (ibq.config.check_values), where the jobs run and how their batch is laid out, and
what a job refuses in its config alone (JOB_CHECKS; for the training apps, ibq.engine.job_config: keys,
precision and the models the config describes, built on the meta device).

The ConfigChecks callback (every primary config names it under hydra.callbacks) checks a run before
Hydra makes its folder, and a multirun up front, one composition per combination of the swept keys that can
change a job's placement or checked values; each job checks itself again when it starts (common.guarded)."""

from __future__ import annotations

import copy
import importlib
import itertools
import os
import re
import shutil
import subprocess
import traceback
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from ibq.config import APPS, check_values, fail, given_overrides, grid_sweeper, one_line, parse, search_space_on_the_grid, sqlite_file, sweep_values
from ibq.engine.ranks import check_deepspeed, detect_ranks, plan_batches
from ibq.errors import UserError, check_positive_int

SUBMITIT_LAUNCHERS = ("submitit_slurm", "submitit_local")
# Swept overrides under these roots can change a job's resources, batch or checked values; the others
# (logger, loss weights, ...) cannot, so the checks compose one job per combination of the former only.
CHECKED_ROOTS = ("cluster", "deepspeed", "train", "ar_train", "model_scale", "experiment", "sweep", "hydra",
                 "seed", "codebook_size", "optim", "ar_optim", "data", "run_dir", "checkpoint", "tokenizer_run", "init_from",
                 "quantizer", "model", "discriminator", "transformer", "eval",
                 "samples", "samples_per_class", "batch_size", "shard_size", "precision", "sampling", "metrics", "reference",
                 "weights", "wandb_mode", "part", "parts", "step")
# module:function that checks each app's job from its config alone; imported only when a job is about to run
# or be submitted (most load torch).
JOB_CHECKS = {
    "train": "ibq.engine.job_config:check_tokenizer_job",
    "train_ar": "ibq.engine.job_config:check_ar_job",
    "tokenize": "ibq.cli.tokenize:check_tokenize_job",
    "sample": "ibq.cli.sample:check_sample_job",
    "eval": "ibq.engine.evaluation_run:check_settings",
}
# The config node with each training app's batch and precision keys.
BATCH_SECTIONS = {"train": "train", "train_ar": "ar_train"}
# Apps whose ranks share out a job's work without a batch to lay out; the others run one process per job.
SHARED_BY_RANKS = {"tokenize"}
# The runs each app reads: (key, the kind of run it names (engine.checkpoint.RUN_KINDS), whether it is
# required). ibq-sample's folder lies inside its run_dir, so a missing run must be refused before Hydra makes it.
RUN_INPUTS = {
    "sample": [("run_dir", "generator", True)],
    "tokenize": [("tokenizer_run", "tokenizer", True)],
    "train_ar": [("tokenizer_run", "tokenizer", True), ("init_from", "generator", False)],
    "train": [("init_from", "tokenizer", False), ("train.extend_from", "tokenizer", False)],
    "eval": [("run_dir", "tokenizer", False), ("checkpoint", "tokenizer", False)],
}
# Runs read only when a run starts: one that resumes from its own checkpoint no longer needs them.
STARTING_POINTS = {"init_from", "train.extend_from"}


def checked_variants(overrides: list[str], parser: OverridesParser | None = None) -> list[list[str]]:
    """The jobs to check out of a sweep's overrides. A range or list under CHECKED_ROOTS multiplies them,
    any other takes its first value; a sweep without a list of values (interval, for a search sweeper)
    is left to each job. `glob` over a config group needs a `parser` with Hydra's config loader."""
    fixed, swept = [], []
    for arg in overrides:
        override = parser.parse_overrides([arg])[0] if parser else parse(arg)
        if not override.is_sweep_override():
            fixed.append(arg)
            continue
        if not override.is_discrete_sweep():
            continue
        prefix, values = arg.split("=", 1)[0], sweep_values(override, arg)
        if override.key_or_group.split(".")[0].split("/")[0] in CHECKED_ROOTS:
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


def check_node_layout(cluster) -> None:
    """What the preset alone decides: GPUs and tasks per node, nodes of the local executor."""
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
    if cluster.launcher == "submitit_local" and cluster.nodes != 1:
        raise UserError(f"cluster.nodes={cluster.nodes}: cluster={cluster.name} runs on this machine only (nodes=1)")


def check_slurm(cluster) -> None:
    """What only submitting needs: sbatch, the partition, and its nodes' GPUs."""
    if shutil.which("sbatch") is None:
        raise UserError(
            f"cluster={cluster.name} needs Slurm's sbatch, which is not on PATH here: submit from a Slurm login node, "
            f"or start the local cluster with `make slurm-up` (--cfg, dry_run=true and ibq-sweep plan work without it)"
        )
    gpus = cluster.gpus_per_node or 0
    if cluster.partition is not None:
        partitions = [name.rstrip("*") for name in slurm_query("-o", "%R")]
        if cluster.partition not in partitions:
            raise UserError(f"cluster.partition={cluster.partition} does not exist on this Slurm cluster; partitions: {', '.join(partitions) or 'none'}")
    if gpus and partition_gpus(cluster.partition) < gpus:
        where = f"partition {cluster.partition}" if cluster.partition else "the default partition"
        raise UserError(f"cluster.gpus_per_node={gpus}, but the nodes of {where} have at most {partition_gpus(cluster.partition)} GPUs")


def check_run_inputs(cfg: DictConfig, config_name: str, run_dir: Path | None = None) -> None:
    """The runs the job reads exist and hold a checkpoint (not read yet). A dry run reads none; ibq-eval
    of samples= reads no run (its run_dir, if any, only records the results); a run in `run_dir` that
    resumes from its own checkpoint reads no STARTING_POINTS."""
    if cfg.get("dry_run") or (config_name == "eval" and cfg.get("samples")):
        return
    from ibq.engine.checkpoint import CHECKPOINT, locate_parent, locate_run  # here, not at import: its module loads torch

    resuming = run_dir is not None and (run_dir / CHECKPOINT).is_file()
    for key, kind, required in RUN_INPUTS.get(config_name, []):
        path = OmegaConf.select(cfg, key, default=None)  # None for ??? too
        if (path is not None or required) and not (resuming and key in STARTING_POINTS):
            if key == "init_from":
                locate_parent(path, kind)
            else:
                locate_run(path, key, kind, outside_a_run=key == "checkpoint")


def check_job(cfg: DictConfig, config_name: str, submitting: bool = False, run_dir: Path | None = None) -> None:
    """A job's values, cluster preset, batch layout (cfg[section]), DeepSpeed options, its engine's
    checks and the runs it reads (those of its `run_dir`, where known); with `submitting`, also what
    Slurm must offer."""
    check_values(cfg)
    check_layout(cfg, config_name, submitting)
    if config_name in JOB_CHECKS:
        module, function = JOB_CHECKS[config_name].split(":")
        getattr(importlib.import_module(module), function)(cfg)
    check_run_inputs(cfg, config_name, run_dir)


def check_layout(cfg: DictConfig, config_name: str, submitting: bool) -> None:
    cluster, section = cfg.get("cluster"), BATCH_SECTIONS.get(config_name)
    if cluster is None:
        return
    try:
        ranks = world_size(cluster)
        if cluster.launcher in SUBMITIT_LAUNCHERS:
            check_node_layout(cluster)
            if submitting and cluster.launcher == "submitit_slurm":
                check_slurm(cluster)
        if section is None:
            if ranks != 1 and config_name not in SHARED_BY_RANKS:  # every rank would do the whole job again
                raise UserError(
                    f"cluster={cluster.name} gives each job {ranks} processes, but {APPS[config_name]} runs in one: "
                    f"use cluster.nodes=1 cluster.tasks_per_node=1 (with cluster.gpus_per_node=1 for a GPU)"
                )
            return
        batch = cfg[section]
        plan_batches(batch.batch_size, batch.micro_batch_size, ranks, section=section)
        if "deepspeed" in cfg:
            check_deepspeed(OmegaConf.to_container(cfg.deepspeed, resolve=True), batch.precision, section=section)
    except OmegaConfBaseException as error:
        raise UserError(one_line(str(error))) from None


def exit_if_refused(check, *args) -> None:
    """Run `check`; what it refuses exits here with one line, since Hydra turns a callback's exception into
    a warning. A defect of the check itself exits too, with its traceback: a run or sweep must not start
    unchecked."""
    try:
        check(*args)
    except UserError as error:
        fail(str(error))
    except (HydraException, OmegaConfBaseException) as error:
        fail(one_line(str(error)))
    except Exception as error:
        traceback.print_exc()
        fail(f"the checks before the job failed ({type(error).__name__}: {one_line(str(error))}): nothing was started; "
             f"the traceback above shows where", 1)


def sweep_lines(config: DictConfig) -> list[str]:
    """A sweep's overrides: its sweep files' params, then the command line (whose key replaces theirs)."""
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    return [f"{key}={value}" for key, value in params.items()] + given_overrides(config.hydra)


def check_distinct_run_dirs(config: DictConfig, overrides: list) -> None:
    """Jobs that differ only in keys that do not name a run directory (exclude_keys: where a run runs and
    logs, how its step uses the device, ...) would share one: the second would resume or re-evaluate
    the first's run, or be refused as another configuration. Where hydra.sweep.subdir names jobs by their
    overrides and not by number, as the apps' configs do. A key the subdir names itself
    (${ibq.run_name:${tokenizer_run}}) tells jobs apart where its values give different folders."""
    subdir = str(OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir"))
    if "hydra.job.override_dirname" not in subdir or "job.num" in subdir:
        return
    unnamed = set(OmegaConf.select(config, "hydra.job.config.override_dirname.exclude_keys", default=None) or [])
    hint = "sweep them into separate folders with hydra.sweep.subdir (e.g. hydra.sweep.subdir=job${hydra.job.num})"
    for override in overrides:
        key = override.get_key_element()
        if not (override.is_discrete_sweep() and key in unnamed):
            continue
        values = list(dict.fromkeys(override.sweep_string_iterator()))
        if f"${{{key}}}" not in subdir:
            if len(values) > 1:
                raise UserError(f"{key}={','.join(values)}: these jobs would share one run directory, since {key} does "
                                f"not name runs (hydra.job.config.override_dirname.exclude_keys); {hint}")
            continue
        folders = [job_subdir(config, key, value) for value in values]
        for folder in folders:
            alike = [value for value, other in zip(values, folders) if other == folder]
            if folder is not None and len(alike) > 1:
                raise UserError(f"{key}={','.join(alike)}: these jobs would share one run directory, since "
                                f"hydra.sweep.subdir names each of them {folder!r}; {hint}")


def check_one_sweep_dir(config: DictConfig, overrides: list) -> None:
    """Hydra resolves hydra.sweep.dir in each job's config: one that names a swept key (ibq-sample's
    ${oc.select:run_dir,outputs}/samples/…) would give each job a sweep folder of its own, and the
    sweep's record of its jobs (their outcomes, its summary, ibq-sweep status) would be in none of them.
    Read from its text, not resolved per value as job_subdir does: a second ${now:…} may fall in the next second."""
    sweep_dir = str(OmegaConf.to_container(config.hydra.sweep, resolve=False).get("dir"))
    for override in overrides:
        key = override.get_key_element()
        values = list(dict.fromkeys(override.sweep_string_iterator())) if override.is_discrete_sweep() else []
        if len(values) > 1 and re.search(rf"\$\{{[^}}]*(?<![\w.]){re.escape(key)}(?![\w.])", sweep_dir):
            raise UserError(f"{key}={','.join(values)}: hydra.sweep.dir ({sweep_dir}) depends on {key}, so these jobs would "
                            f"each get a sweep folder of their own; give the sweep one: hydra.sweep.dir=<folder> "
                            "'hydra.sweep.subdir=job${hydra.job.num}'")


def job_subdir(config: DictConfig, key: str, value: str) -> str | None:
    """hydra.sweep.subdir as a job with `key`=`value` resolves it, leaving out its override_dirname, which
    the check above compares apart (None where the subdir cannot be resolved before the job runs)."""
    job = copy.deepcopy(config)
    with read_write(job), open_dict(job):
        OmegaConf.update(job, key, value, force_add=True)
        job.hydra.job.override_dirname = "…"
    try:
        return str(job.hydra.sweep.subdir)
    except OmegaConfBaseException:
        return None


def sweeper_directions(config: DictConfig) -> list[str] | None:
    """hydra.sweeper.direction as a list of names; None for a sweeper without directions (the grid)."""
    directions = OmegaConf.select(config, "hydra.sweeper.direction")
    if directions is None:
        return None
    # A string or an enum (the sweeper's structured config), or a list of them.
    return [getattr(d, "name", str(d)) for d in (directions if OmegaConf.is_list(directions) else [directions])]


def check_objectives(config: DictConfig) -> None:
    """A search sweeper's directions (Optuna's hydra.sweeper.direction) against the objectives each trial
    returns (common.objective_values): Optuna finds a mismatch only once the first trials have run."""
    directions = sweeper_directions(config)
    if directions is None:
        return
    objectives = list(config.get("objectives") or [])
    named = f"hydra.sweeper.direction=[{','.join(directions)}]"
    if not objectives:
        raise UserError(f"{named}: a search needs what each trial returns, one results.json key per direction, e.g. "
                        f"+objectives=[{','.join(['rfid', 'psnr', 'ssim'][:len(directions)])}]")
    if len(objectives) != len(directions):
        raise UserError(f"objectives=[{','.join(objectives)}] are {len(objectives)} but {named} are {len(directions)}: "
                        f"give one direction (maximize or minimize) per objective")


def check_trial_counts(config: DictConfig) -> None:
    """Optuna's trial counts: with no trial it fails after the launch (no best trial to write), and with
    no job per batch it divides by zero."""
    for key in ("n_trials", "n_jobs"):
        value = OmegaConf.select(config, f"hydra.sweeper.{key}")
        if isinstance(value, int) and value < 1:
            raise UserError(f"hydra.sweeper.{key}={value}: a search needs at least 1; give hydra.sweeper.{key}=1 or more")


SAMPLER_SEEDS = "ibq/sampler_seeds"  # a stored study's user attribute: the seeds its launches' samplers used


@dataclass(frozen=True)
class StoredSearch:
    """A search whose study lives in an Optuna storage (hydra.sweeper.storage and study_name): a later
    launch with both continues it, each launch adding hydra.sweeper.n_trials trials."""

    storage: str
    name: str
    seed: int | None  # hydra.sweeper.sampler.seed

    @classmethod
    def of(cls, config: DictConfig) -> StoredSearch | None:
        storage, name = (OmegaConf.select(config, f"hydra.sweeper.{key}") for key in ("storage", "study_name"))
        if storage is None or name is None:
            return None  # a study in memory, or under a new name each launch
        return cls(str(storage), str(name), OmegaConf.select(config, "hydra.sweeper.sampler.seed"))

    @property
    def sqlite_file(self) -> Path | None:
        return sqlite_file(self.storage)

    def new_file(self) -> bool:
        """A SQLite storage that does not exist yet (opening it creates it)."""
        return self.sqlite_file is not None and not self.sqlite_file.is_file()

    def opened(self, open_storage):
        """`open_storage()`, or one line naming the storage instead of Optuna's traceback after the launch."""
        try:
            return open_storage()
        except Exception as error:  # SQLAlchemy's and Optuna's errors differ by backend
            raise UserError(f"hydra.sweeper.storage={self.storage} cannot be opened ({type(error).__name__}: "
                            f"{one_line(str(error)) or 'no message'}): give an Optuna storage URL, e.g. "
                            f"hydra.sweeper.storage=sqlite:///search.db") from None


def check_continued_study(config: DictConfig) -> None:
    """A launch that continues a stored study with a sampler seed an earlier launch of it used would draw
    that launch's points again: runs done already, trained again in the new sweep folder."""
    search = StoredSearch.of(config)
    if search is None or search.seed is None or search.new_file():
        return
    import optuna  # here, not at import: only searches need it

    summaries = search.opened(lambda: optuna.study.get_all_study_summaries(search.storage))
    study = next((summary for summary in summaries if summary.study_name == search.name), None)
    used = study.user_attrs.get(SAMPLER_SEEDS, []) if study is not None else []
    if search.seed in used:
        raise UserError(f"hydra.sweeper.storage={search.storage} holds study {search.name} ({study.n_trials} trials), which "
                        f"this search continues; its launches used hydra.sweeper.sampler.seed={','.join(map(str, used))}, and "
                        f"a seed used before draws the same points again: give another, e.g. hydra.sweeper.sampler.seed={max(used) + 1}")


def record_sampler_seed(config: DictConfig) -> None:
    """Once the checks have passed: the stored study keeps the seed this launch's sampler uses, so that a
    later launch is refused the same one. The study is made here as the sweeper makes it, which then
    loads it."""
    search = StoredSearch.of(config)
    if search is None or search.seed is None or config.get("dry_run"):
        return
    import optuna

    if search.sqlite_file is not None:  # SQLite makes the file, not its folder
        search.sqlite_file.parent.mkdir(parents=True, exist_ok=True)
    study = search.opened(lambda: optuna.create_study(study_name=search.name, storage=search.storage,
                                                      directions=sweeper_directions(config), load_if_exists=True))
    study.set_user_attr(SAMPLER_SEEDS, sorted({*study.user_attrs.get(SAMPLER_SEEDS, []), search.seed}))


def check_sweep(config: DictConfig, config_name: str) -> None:
    check_objectives(config)
    check_trial_counts(config)
    check_continued_study(config)
    hydra_overrides = given_overrides(config.hydra, "hydra")
    submitting = not config.get("dry_run", False)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    overrides = parser.parse_overrides(sweep_lines(config))
    if grid_sweeper(config):  # which would fail at its first job with Hydra's traceback
        searched = [o.input_line for o in overrides if o.is_sweep_override() and not o.is_discrete_sweep()]
        if searched:
            raise search_space_on_the_grid(searched[0])
    for variant in checked_variants(given_overrides(config.hydra), parser):
        check_job(compose(config_name, overrides=hydra_overrides + variant), config_name, submitting)
    check_one_sweep_dir(config, overrides)  # after the values: a bad one is the first thing to mend
    check_distinct_run_dirs(config, overrides)


class ConfigChecks(Callback):
    def on_run_start(self, config: DictConfig, config_name: str | None = None, **kwargs) -> None:
        """The job, before Hydra makes its folder (hydra.run.dir may lie inside a run it reads)."""
        exit_if_refused(check_job, config, config_name, False, Path(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs) -> None:
        """Every job of the sweep, before its folder is made or anything is submitted. For a submitit
        cluster, also the requeue signal that submitit asks Slurm to send."""
        exit_if_refused(check_sweep, config, config_name)
        exit_if_refused(record_sampler_seed, config)
        cluster = config.get("cluster")
        if cluster is not None and cluster.launcher in SUBMITIT_LAUNCHERS and cluster.requeue_signal:
            os.environ["SUBMITIT_PREEMPT_SIGNAL"] = str(cluster.requeue_signal).upper().removeprefix("SIG")
