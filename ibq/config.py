"""Configuration helpers shared by every layer: where the config folders are, instantiating a config
node, the checks of command-line overrides, and Hydra's multi-line errors condensed to one line.

A leaf module: it imports nothing of ibq but the errors, so cli, ledger and data all use it."""

from __future__ import annotations

import itertools
import math
import os
import re
import shlex
import sys
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from hydra.errors import HydraException, InstantiationException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ibq.errors import UserError
from ibq.runs.record import run_dirname, run_name


def find_conf_dir() -> Path:
    """The primary config folder: inside the installed package (a wheel carries conf/, experiments/ and
    sweeps/ as ibq/conf), else the checkout's top-level conf/."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "conf"


CONF_DIR = find_conf_dir()
SWEEPS_DIR = CONF_DIR / "sweep"
# The console script of each primary config.
APPS = {"train": "ibq-train", "train_ar": "ibq-train-ar", "tokenize": "ibq-tokenize", "sample": "ibq-sample", "eval": "ibq-eval"}

# Resolvers the primary configs use: a run directory's name, the name of the run a job reads (for its
# output folder), and a cluster preset's run mode (its jobs are submitted as a sweep; a dry run, which
# only builds on the meta device, runs here as -m says).
OmegaConf.register_new_resolver("ibq.dirname", run_dirname, replace=True)
OmegaConf.register_new_resolver("ibq.run_name", run_name, replace=True)
OmegaConf.register_new_resolver("ibq.submit_mode", lambda dry_run: None if dry_run else "MULTIRUN", replace=True)
# The shell lines before a Slurm job's srun: cluster.setup after one that makes srun end the job step when a rank
# dies (killed, or aborted by a CUDA or NCCL error: srun reads SLURM_KILL_BAD_EXIT as --kill-on-bad-exit). Otherwise
# the other ranks would wait for it in their next collective, which NCCL gives up on only after the process
# group's timeout: an hour of every GPU of the job.
KILL_ON_BAD_EXIT = "export SLURM_KILL_BAD_EXIT=1"
OmegaConf.register_new_resolver("ibq.srun_setup", lambda lines: [KILL_ON_BAD_EXIT, *lines], replace=True)


def given_overrides(hydra: DictConfig | None, kind: str = "task") -> list[str]:
    """hydra.overrides.<kind> (task or hydra) as given: iterating the node would resolve an override's
    own interpolation (hydra.sweep.subdir=${hydra.job.num}, train.steps=${eval.every}) as part of the text."""
    node = None if hydra is None else OmegaConf.select(hydra, f"overrides.{kind}", default=None)
    return [] if node is None else [str(line) for line in OmegaConf.to_container(node, resolve=False)]


def keys_with_nodes(keys: list, nodes: list, _root_: DictConfig) -> list[str]:
    """`keys`, and each of `nodes` with every key inside it as composed or named by the command line's
    overrides (a deleted one, ~cluster.mem_gb, is no longer in the composed node): the exclude_keys of
    hydra.job.config.override_dirname, which Hydra matches exactly, so that no override under
    cluster (cluster.time_min=1440) or logger (logger.mode=online) names a run directory."""
    def walk(prefix: str, node) -> list[str]:
        inner = node.items() if isinstance(node, dict) else []
        return [prefix] + [key for name, value in inner for key in walk(f"{prefix}.{name}", value)]

    found = [key for name in nodes if name in _root_ for key in walk(name, OmegaConf.to_container(_root_[name]))]
    overridden = [line.lstrip("~+").split("=", 1)[0] for line in given_overrides(_root_.get("hydra"))]
    return list(keys) + found + [key for key in overridden if key.split(".")[0] in nodes and key not in found]


OmegaConf.register_new_resolver("ibq.keys_with_nodes", keys_with_nodes, replace=True)


def user_cache(name: str) -> str:
    """A folder of ibq's cache, ${ibq.cache:fid_stats}: under $IBQ_CACHE_DIR (a cluster's scratch space), else
    $XDG_CACHE_HOME/ibq, else ~/.cache/ibq."""
    root = os.environ.get("IBQ_CACHE_DIR") or f"{os.environ.get('XDG_CACHE_HOME') or os.environ.get('HOME', '.') + '/.cache'}/ibq"
    return f"{root}/{name}"


OmegaConf.register_new_resolver("ibq.cache", user_cache, replace=True)


def open_node() -> DictConfig:
    """An empty node that takes new keys: Hydra's struct mode refuses a dict override with new keys
    (cluster.sbatch={constraint: a100}) in YAML nodes, but keeps this node's flag through merging.
    Group configs place it under such keys (`- /hydra/ibq_open/node@cluster.sbatch`)."""
    node = OmegaConf.create({})
    OmegaConf.set_struct(node, False)
    return node


ConfigStore.instance().store(group="hydra/ibq_open", name="node", node=open_node())


# What Python says of a call whose keywords do not fit the callable's signature.
ARGUMENTS_REFUSED = re.compile(r"got an unexpected keyword argument|missing \d+ required (positional|keyword-only) argument")


def build(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, re-raising a UserError from inside the constructed object as itself, and a
    `_target_` that cannot be imported or keys its callable does not take as a UserError naming the node."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        refused = config_error(error)
        if refused is not None:
            raise refused from None
        raise


def config_error(error: InstantiationException) -> UserError | None:
    """The config's part of a failed instantiate (Hydra names the node in a `full_key:` line); None for an
    error raised inside the callable, which is a bug to be shown whole."""
    text = str(error)
    key = re.search(r"^full_key: (\S+)$", text, re.MULTILINE)
    target = re.search(r"target '([^']+)'", text)
    if key is None or target is None:
        return None
    node, target = key.group(1), target.group(1)
    innermost = error
    while innermost.__cause__ is not None:
        innermost = innermost.__cause__
    if text.startswith("Error locating target"):
        return UserError(f"{node}._target_={target!r} cannot be imported ({innermost}): name a class or function of an "
                         f"installed module, or put its package on PYTHONPATH")
    if isinstance(error.__cause__, TypeError) and ARGUMENTS_REFUSED.search(str(error.__cause__)):
        return UserError(f"{node} does not fit {target}, whose keyword arguments are its keys: {error.__cause__}")
    return None


def fail(message: str, code: int = 2):
    """A user error: one line on stderr, and a non-zero exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def reader_gone(code: int):
    """stdout's reader went away (`… | head`): exit without Python's second error when it flushes stdout."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)


def one_line(message: str) -> str:
    """Hydra's multi-line composition errors, condensed to the lines that name the problem."""
    noise = ("full_key:", "object_type", "Set the environment variable", "reference_type")
    lines = [line.strip() for line in message.splitlines() if line.strip() and not line.strip().startswith(noise)]
    return "; ".join(lines)


# Hydra flags that take the next argument as their value.
VALUE_FLAGS = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--cfg", "-c", "--package", "-p", "--info", "-i"}


def override_args(argv: list[str]) -> list[str]:
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-") and "=" in arg:
            args.append(arg)
    return args


def available(group_dir: Path) -> list[str]:
    return sorted(p.stem for p in group_dir.glob("*.yaml"))


# Values that Hydra's override grammar and a shell both take as they are.
PLAIN_VALUE = re.compile(r"[\w./-]+")


def hydra_value(value) -> str:
    """`value` as an override's value: quoted where Hydra's grammar would read part of it as syntax ('=', ',',
    spaces, brackets), as in every run directory named after its overrides."""
    text = str(value)
    if PLAIN_VALUE.fullmatch(text):
        return text
    # Hydra reads a backslash as an escape only before a quote (or the closing one): those are doubled.
    escaped = re.sub(r'(\\*)("|$)', lambda m: m.group(1) * 2 + ("\\" + m.group(2) if m.group(2) else ""), text)
    return f'"{escaped}"'


def sqlite_file(storage: str, cwd: str | Path | None = None) -> Path | None:
    """The file of an SQLite storage URL (Optuna's hydra.sweeper.storage=sqlite:///<path>), a relative path
    taken from `cwd` where given; None for another kind of storage."""
    if not storage.startswith("sqlite:///"):
        return None
    file = Path(storage.removeprefix("sqlite:///"))
    return file if cwd is None or file.is_absolute() else Path(cwd) / file


def shell_override(key: str, value) -> str:
    """key=value as typed into a shell: 'run_dir="outputs/multirun/<time>/codebook_size=1024,seed=0"'."""
    return shlex.quote(f"{key}={hydra_value(value)}")


def unparsable(line: str, error: Exception) -> UserError:
    """An override Hydra's grammar refuses, named; a value with '=' in it, as in every run directory named
    after its overrides (outputs/multirun/<time>/codebook_size=1024), is told the quotes it needs."""
    message = f"cannot parse the override {line!r}: {one_line(str(error))}"
    key, _, value = line.partition("=")
    if "=" in value:
        message += f"; a value with '=' in it must be quoted: '{key}=\"{value}\"' (several: '{key}=\"<first>\",\"<second>\"')"
    return UserError(message)


def parse(arg: str):
    try:
        return OverridesParser.create().parse_override(arg)
    except HydraException as error:
        raise unparsable(arg, error) from None


def group_choices(argv: list[str], conf_dir: Path):
    """(argument, group, [choices]) for each override that selects from an ibq config group by name (a glob
    names the group's files itself; Hydra's own groups, hydra/*, also have their choices in Hydra and its plugins)."""
    for arg in override_args(argv):
        override = parse(arg)
        group_dir = conf_dir / override.key_or_group
        if (override.is_delete() or override.package is not None or not group_dir.is_dir() or isinstance(override.value(), Glob)
                or override.key_or_group.startswith("hydra/")):
            continue
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        yield arg, override.key_or_group, [str(value) for value in values]


def sweep_values(override, arg: str) -> list[str]:
    """The values of a discrete sweep (`arg`, parsed with Hydra's config loader where it globs a group),
    refusing one that has none: Hydra would launch no job and say nothing of the typo."""
    values = list(override.sweep_string_iterator())
    if values:
        return values
    if isinstance(override.value(), Glob) and override.config_loader is not None:
        group = override.key_or_group
        raise UserError(f"{arg} matches no config of {group}; valid: {', '.join(override.config_loader.get_group_options(group))}")
    raise UserError(f"{arg} is a sweep of no values")


def first_of_each_sweep(args: list[str], config_loader) -> list[str]:
    """One job's overrides out of a sweep: each `key=a,b` becomes `key=a`. The loader (Hydra's, in an
    initialized context) lists a group's configs for a glob over it (`quantizer=glob(*)`)."""
    parser = OverridesParser.create(config_loader=config_loader)
    single = []
    for arg in args:
        try:
            (override,) = parser.parse_overrides([arg])  # which gives each override the loader
        except HydraException as error:
            raise unparsable(arg, error) from None
        if override.is_sweep_override() and not override.is_discrete_sweep():
            continue  # a search space: a search sweeper draws it, the grid refuses it (sweep_jobs)
        if override.is_sweep_override():
            arg = f"{arg.split('=', 1)[0]}={sweep_values(override, arg)[0]}"
        single.append(arg)
    return single


def grid_sweeper(config: DictConfig) -> bool:
    """Whether the sweep is Hydra's basic (grid) sweeper's, whose jobs are known ahead."""
    return str(OmegaConf.select(config, "hydra.sweeper._target_", default="")).endswith("BasicSweeper")


def search_space_on_the_grid(line: str) -> UserError:
    return UserError(f"{line}: a search space, not a list, takes a search sweeper (hydra/sweeper=optuna, as in "
                     f"sweeps/lr_entropy_search.yaml); the grid sweeper needs a list or range")



# ----------------------------------------------------------------------------- sweeps, with public APIs
def sweep_jobs(overrides: list) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of parsed overrides (sweep-file params first, then the
    command line): one key's later override replaces its earlier one, and the jobs are the cartesian
    product of the lists, in order."""
    lists: dict[str, list[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            lists[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            lists[key] = [f"{key}={value}" for value in sweep_values(override, override.input_line)]
        else:
            raise search_space_on_the_grid(override.input_line)
    return [list(job) for job in itertools.product(*lists.values())]


def overrides_dirname(overrides: list, exclude_keys: list[str], item_sep: str = ",", kv_sep: str = "=") -> str:
    """hydra.job.override_dirname of a job: its override lines but the excluded keys, sorted and joined."""
    lines = sorted(override.input_line for override in overrides if override.key_or_group not in exclude_keys)
    return item_sep.join(lines).replace("=", kv_sep)


def apply_overrides(cfg: DictConfig, overrides: list) -> None:
    """Plain-key overrides (key=, +key=, ++key=, ~key) applied to a composed config as Hydra applies them."""
    for override in overrides:
        key, value = override.key_or_group, override.value()
        if override.is_delete():
            parent, _, leaf = key.rpartition(".")
            with open_dict(cfg):
                del (OmegaConf.select(cfg, parent) if parent else cfg)[leaf]
        else:
            OmegaConf.update(cfg, key, value, merge=True, force_add=override.is_add() or override.is_force_add())

def choice_error(group: str, choice: str, valid: list[str]) -> UserError:
    """A `group=choice` that names no config file of the group."""
    return UserError(
        f"{group}={choice} is not a config in {group}/ of the search path; valid: {', '.join(sorted(valid))} "
        f"(a preset of your own: --config-dir DIR with {group}/{choice}.yaml in DIR)"
    )


def missing_config_line(error: MissingConfigException) -> str:
    """Hydra's report of a group choice without a config file, as one line."""
    group, _, choice = (error.missing_cfg_file or "").rpartition("/")
    if not group or error.options is None:
        return one_line(str(error))
    return str(choice_error(group, choice, list(error.options)))


def check_group_choices(argv: list[str], conf_dir: Path) -> None:
    """Every `group=choice` names an existing config file of `conf_dir`."""
    for _, group, choices in group_choices(argv, conf_dir):
        valid = available(conf_dir / group)
        for choice in choices:
            if choice not in valid:
                raise choice_error(group, choice, valid)


# ------------------------------------------------------------------------------------------- value checks
def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_fraction(value) -> bool:
    return is_number(value) and 0 <= value < 1


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


KEEP_EVERY = ("an integer >= 0 (0: keep checkpoints/last.pt only)", lambda v: is_integer(v) and v >= 0)


# Keys whose values Hydra accepts but no run can use: what each must be, and the test. Keys an app's
# config lacks are skipped.
VALUE_RULES = {
    "seed": ("an integer", is_integer),
    "codebook_size": ("a positive integer, e.g. 16384", lambda v: is_integer(v) and v > 0),
    "optim.lr": ("a finite number > 0", lambda v: is_number(v) and math.isfinite(v) and v > 0),
    "ar_optim.lr": ("a finite number > 0", lambda v: is_number(v) and math.isfinite(v) and v > 0),
    "optim.betas": ("two numbers in [0, 1), e.g. [0.5,0.9]", lambda v: isinstance(v, list) and len(v) == 2 and all(map(is_fraction, v))),
    "ar_optim.betas": ("two numbers in [0, 1), e.g. [0.9,0.95]", lambda v: isinstance(v, list) and len(v) == 2 and all(map(is_fraction, v))),
    "data.num_workers": ("an integer >= 0 (0: load in the training process)", lambda v: is_integer(v) and v >= 0),
    "train.ema_decay": ("a number in [0, 1)", is_fraction),
    "train.keep_every": KEEP_EVERY,
    "ar_train.keep_every": KEEP_EVERY,
    "init_from_classes": ("parent (its class embeddings) or fresh (new ones, for a label set of this run's own)",
                          lambda v: v in ("parent", "fresh")),
}
MISSING = object()


def check_values(cfg: DictConfig) -> None:
    """One line for the first value no run can use, and for a quantizer whose size is not codebook_size."""
    for key, (valid, test) in VALUE_RULES.items():
        value = OmegaConf.select(cfg, key, default=MISSING, throw_on_missing=False, throw_on_resolution_failure=False)
        if value is MISSING or value is None or OmegaConf.is_missing(cfg, key):
            continue
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        if not test(value):
            raise UserError(f"{key}={value!r} is invalid: it must be {valid}")
    size, quantizer_size = (OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
                            for key in ("codebook_size", "quantizer.codebook_size"))
    if None not in (size, quantizer_size) and size != quantizer_size:
        raise UserError(
            f"codebook_size={size} and quantizer.codebook_size={quantizer_size} disagree: give the size once, "
            f"as codebook_size={quantizer_size} (quantizer.codebook_size follows it)"
        )
