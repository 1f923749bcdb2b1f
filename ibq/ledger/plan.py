"""A sweep's jobs before launch: the overrides Hydra's basic sweeper will give each job, the run
directory it will get, its signature and a device-hour estimate. Nothing is run.

Jobs are expanded exactly as `ibq-train -m` expands them: the sweep file's `hydra.sweeper.params`
first, command-line overrides after (a command-line key replaces the same key from the file), then
the cartesian product (ibq.config.sweep_jobs, as Hydra's basic sweeper). Composing one config per job
with Hydra takes ~0.1-0.2 s each; jobs that select the same config-group options share one composition,
to which each job's plain key overrides are applied as Hydra applies them (ibq.config.apply_overrides),
which yields the config (and signature) the job itself will compose; a stage-II job's signature also
holds what it reads of its tokenizer run (stage_two_signature). Only Hydra's public API is used."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ibq.config import (CONF_DIR, SWEEPS_DIR, apply_overrides, available, check_group_choices, first_of_each_sweep, grid_sweeper, one_line,
                        overrides_dirname, sweep_jobs, unparsable)
from ibq.errors import UserError
from ibq.ledger.cost import Estimate, Throughput, estimate
from ibq.ledger.runs import load_run
from ibq.runs.record import STAGE_II_KEYS, parent_directory, run_choices, signature, sized_transformer, stage_two_config

# Hydra overrides that say how this invocation runs, not what a job computes or where it lands.
INVOCATION_KEYS = ("hydra.mode", "hydra.sweep.dir")


@dataclass
class Job:
    index: int
    overrides: list[str]
    signature: str | None  # None: known once the job reads its input run (stage_two_signature)
    subdir: str
    choices: dict[str, str]
    estimate: Estimate | None = None


@dataclass
class Plan:
    config_name: str
    arguments: list[str]  # task overrides of the invocation
    hydra_overrides: list[str]
    sweeper_params: dict[str, str]
    sweep_dir: str
    jobs: list[Job] = field(default_factory=list)

    def common_overrides(self) -> list[str]:
        """Overrides every job shares (printed once instead of on every line)."""
        if not self.jobs:
            return []
        shared = set(self.jobs[0].overrides)
        for job in self.jobs[1:]:
            shared &= set(job.overrides)
        return [o for o in self.jobs[0].overrides if o in shared]

    def to_dict(self) -> dict:
        data = asdict(self)
        for job in data["jobs"]:
            job.pop("estimate")
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        jobs = [Job(**job) for job in data.get("jobs", [])]
        return cls(
            config_name=data.get("config_name", "train"),
            arguments=list(data.get("arguments", [])),
            hydra_overrides=list(data.get("hydra_overrides", [])),
            sweeper_params=dict(data.get("sweeper_params") or {}),
            sweep_dir=data.get("sweep_dir", ""),
            jobs=jobs,
        )


def sweep_names() -> list[str]:
    return available(SWEEPS_DIR)


# Keys a tokenizer run leaves out of its signature (model_scale also sets stage II's), as in TokenizerTraining.
UNSIGNED_KEYS = {"train": STAGE_II_KEYS}


def has_default(config_name: str, group: str) -> bool:
    """Whether the primary config's defaults list selects from `group` (else a choice must be appended: +group=)."""
    defaults = OmegaConf.load(CONF_DIR / f"{config_name}.yaml").get("defaults") or []
    return any(isinstance(entry, DictConfig) and any(str(key).split()[-1] == group for key in entry) for entry in defaults)


def sweep_arguments(name: str, config_name: str = "train") -> list[str]:
    """`codebook_scaling` -> ['sweep=codebook_scaling'], after checking that the sweep file exists."""
    if name not in sweep_names():
        raise UserError(f"unknown sweep {name!r}; sweeps: {', '.join(sweep_names()) or 'none'} (files in {SWEEPS_DIR.resolve()})")
    return [f"{'' if has_default(config_name, 'sweep') else '+'}sweep={name}"]


def parse(line: str, parser: OverridesParser):
    try:
        return parser.parse_override(line)
    except HydraException as error:
        raise unparsable(line, error) from None


def composed(config_name: str, overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name, overrides=overrides, return_hydra_config=True)
    except Exception as error:  # Hydra raises several unrelated types for bad overrides
        raise UserError(one_line(str(error))) from None


def expand(arguments: list[str], config_name: str = "train", sweeper_params: dict | None = None,
           measured: dict[tuple[str, str], Throughput] | None = None) -> Plan:
    """The jobs of `ibq-train -m <arguments>`, arguments as typed. With `sweeper_params`, the arguments
    and params recorded when a sweep was launched (multirun.yaml), instead of what the sweep files hold now;
    `measured`: the throughput of completed runs, for the device-hour estimates."""
    if sweeper_params is None:
        check_group_choices(arguments, CONF_DIR)
    plain_parser = OverridesParser.create()
    parsed = [parse(arg, plain_parser) for arg in arguments]
    hydra_args = [arg for arg, o in zip(arguments, parsed) if o.is_hydra_override()]
    task_args = [arg for arg, o in zip(arguments, parsed) if not o.is_hydra_override()]
    job_hydra_args = [arg for arg in hydra_args if arg.split("=", 1)[0].lstrip("+~") not in INVOCATION_KEYS]

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=config_name):
        loader = GlobalHydra.instance().config_loader()
        groups = config_groups(loader)
        master = composed(config_name, hydra_args + first_of_each_sweep(task_args, loader))
        sweeper = str(OmegaConf.select(master, "hydra.sweeper._target_", default=""))
        if not grid_sweeper(master):
            raise UserError(
                f"this sweep is a search ({sweeper.rsplit('.', 1)[-1]}): its trials are chosen as it runs, so there is no plan "
                f"ahead; run it with ibq-train -m and follow it with ibq-sweep status <sweep dir>"
            )
        if sweeper_params is None:
            params = OmegaConf.select(master, "hydra.sweeper.params", default=None)
            sweeper_params = {str(k): str(v) for k, v in (params or {}).items()}
        sweep_parser = OverridesParser.create(config_loader=loader)
        lines = [f"{k}={v}" for k, v in sweeper_params.items()] + task_args
        try:
            job_lines = sweep_jobs(sweep_parser.parse_overrides(lines))
        except HydraException as error:
            raise UserError(one_line(str(error))) from None

        plan = Plan(config_name, task_args, job_hydra_args, sweeper_params, str(OmegaConf.select(master, "hydra.sweep.dir")))
        bases: dict[tuple[str, ...], Base] = {}
        parsed_lines = {}  # the same few lines recur in every job, and parsing is slow
        for index, lines in enumerate(job_lines):
            for line in lines:
                if line not in parsed_lines:
                    parsed_lines[line] = parse(line, plain_parser)
            overrides = [parsed_lines[line] for line in lines]
            selects_config = [o.is_hydra_override() or o.key_or_group in groups for o in overrides]
            selected = tuple(job_hydra_args) + tuple(line for line, chosen in zip(lines, selects_config) if chosen)
            if selected not in bases:
                bases[selected] = Base(composed(config_name, list(selected)), config_name, measured)
            plain = [o for o, chosen in zip(overrides, selects_config) if not chosen]
            plan.jobs.append(bases[selected].job(index, lines, overrides, plain))
    return plan


def config_groups(loader, parent: str = "") -> set[str]:
    """Every config group on the search path (quantizer, data/source, hydra/launcher, ...)."""
    groups = set()
    for name in loader.list_groups(parent):
        path = f"{parent}/{name}" if parent else name
        groups |= {path} | config_groups(loader, path)
    return groups


class Base:
    """One composition shared by the jobs that select the same config-group options.

    The task config and the small parts of the hydra node that jobs need are split off once:
    copying the whole hydra node for every job would cost more than the composition itself."""

    def __init__(self, cfg: DictConfig, config_name: str = "train", measured: dict | None = None):
        self.config_name = config_name
        self.unsigned_keys = UNSIGNED_KEYS.get(config_name, ())
        self.measured = measured
        self.task = copy.deepcopy(cfg)
        with read_write(self.task), open_dict(self.task):
            del self.task["hydra"]
        self.needs_hydra = "${hydra:" in OmegaConf.to_yaml(self.task)
        self.dirname_conf = OmegaConf.to_container(cfg.hydra.job.config.override_dirname, resolve=True)
        self.naming = OmegaConf.create(
            {"hydra": {"job": OmegaConf.to_container(cfg.hydra.job, resolve=False),
                       "sweep": {"subdir": OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]}}}
        )
        self.hydra_choices = cfg.hydra.runtime.choices
        self.with_hydra = cfg

    def job(self, index: int, lines: list[str], overrides: list, plain: list) -> Job:
        if self.needs_hydra:
            HydraConfig.instance().set_config(self.with_hydra)  # ${hydra:...} resolves as when the job runs
        task = copy.deepcopy(self.task)
        try:
            apply_overrides(task, plain)
        except Exception as error:
            raise UserError(f"job {' '.join(lines)}: {one_line(str(error))}") from None
        naming = self.naming
        naming.hydra.job.override_dirname = overrides_dirname(
            overrides, list(self.dirname_conf["exclude_keys"]), self.dirname_conf["item_sep"], self.dirname_conf["kv_sep"]
        )
        naming.hydra.job.num = index
        with read_write(task), open_dict(task):  # the subdir may name a task key: ${ibq.run_name:${tokenizer_run}}
            task.hydra = naming.hydra
            subdir = str(task.hydra.sweep.subdir)
            del task["hydra"]
        choices = {k: str(v) for k, v in run_choices(task, self.hydra_choices).items() if v is not None}
        job_estimate = estimate(self.with_hydra, task, self.config_name, choices.get("model_scale"), self.measured)
        if self.unsigned_keys:  # as runs.record.without_keys, on this job's own copy
            OmegaConf.resolve(task)
            with open_dict(task):
                for key in self.unsigned_keys:
                    task.pop(key, None)
            if task.get("init_from") is not None:  # as runs.record.tokenizer_identity
                task.init_from = parent_directory(task.init_from)
        signed = stage_two_signature(task) if self.config_name == "train_ar" else signature(task)
        return Job(index, list(lines), signed, subdir, choices, job_estimate)


def stage_two_signature(task: DictConfig) -> str | None:
    """The signature a stage-II job will record (runs.record.stage_two_config), where the records of its
    tokenizer_run tell what the job will read there: a completed run's signature, step (of a training, in its
    results.json; of an import, in its run.json) and sizes. None where they do not (a run still training)."""
    tokenizer_dir = parent_directory(task.tokenizer_run) if task.get("tokenizer_run") is not None else None
    run = load_run(Path(tokenizer_dir)) if tokenizer_dir is not None else None
    if run is None or run.record.get("kind") != "tokenizer" or run.status != "completed":
        return None
    step = (run.results or {}).get("step", run.record.get("step"))
    codebook_size, levels = run.config.get("quantizer.codebook_size"), run.config.get("model.encoder.ch_mult")
    if None in (step, codebook_size, levels):
        return None
    # The encoder halves the resolution between its levels (models.tokenizer.Tokenizer.downsample_factor).
    try:
        task.transformer = sized_transformer(task, codebook_size, 2 ** (len(json.loads(levels)) - 1), Path(tokenizer_dir))
    except UserError:  # sizes the job refuses before it starts
        return None
    tokenizer = {"signature": run.signature, "step": step, "codebook_size": codebook_size, "weights": "ema"}
    return signature(stage_two_config(task, Path(tokenizer_dir), tokenizer)[1])

