"""The results contract: every run owns a folder with run.json, metrics.jsonl, results.json,
checkpoints/ and media/. metrics.jsonl is the source of truth; W&B mirrors it."""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ibq.errors import UserError

log = logging.getLogger(__name__)


def timestamp() -> str:
    """Local time with its UTC offset, as every record of a run, sweep or shard folder states it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# Keys that change where or how a run is reported, not what it computes (conf/train.yaml's
# override_dirname.exclude_keys lists the same, so that they do not name a run either).
NON_RESULT_KEYS = ("run_dir", "logger", "cluster", "dry_run", "objectives", "train.log_every", "train.checkpoint_every", "train.keep_every",
                   "data.num_workers",
                   "data.read_timeout_s", "eval.every", "eval.reference_cache_dir",
                   "train.extend_from",
                   "train.compile", "train.channels_last", "train.activation_checkpointing", "quantizer.chunk_kernels")
# Top-level keys whose value another key holds (quantizer.codebook_size follows codebook_size; a mismatch is
# refused): the signature hashes the value once, where the model reads it.
REPEATED_KEYS = ("codebook_size",)
# Top-level keys of each stage: model_scale sets both, and a run of one stage leaves the other's out.
STAGE_I_KEYS = ("model", "quantizer", "discriminator", "loss", "optim", "train", "eval")
STAGE_II_KEYS = ("transformer", "sampling", "ar_train")
# ar_train keys that change how a stage-II run reports, not what it trains: left out of its signature, so a
# resume may change them.
AR_REPORTING_KEYS = ("log_every", "checkpoint_every", "keep_every", "grid_classes")
# The transformer's sizes that its tokenizer sets: `auto` takes them from tokenizer_run.
FOLLOWS_TOKENIZER = ("vocab_size", "block_size")
# Config-group choices that say where or how a run was launched or logged, not what it computed.
LAUNCH_CHOICES = ("sweep", "logger", "cluster")
# Plain config keys that name a run as a group choice does: recorded with its choices (run.json, W&B config and
# tags), so that tables, plots and sweep listings show and group them alike.
CHOICE_KEYS = ("codebook_size",)
PACKAGES = ("torch", "torchvision", "hydra-core", "wandb", "submitit", "deepspeed", "scipy", "scikit-image", "lpips", "ibq")


# The longest file name most file systems take (NAME_MAX), in bytes.
NAME_MAX = 255
# The commas between overrides in Hydra's override_dirname, not those inside a value (model.encoder.ch_mult=[1,1]).
OVERRIDE_SEPARATOR = re.compile(r",(?=[^,=\[\]{}()]+=)")


def run_dirname(overrides: str) -> str:
    """A run's directory name from its overrides (Hydra's override_dirname): path separators in values
    (data.root=/data/imagenet) would nest directories, so they become '_'. A name longer than a file system
    takes (a fine-tuning run that repeats its parent's model overrides) keeps the overrides that fit,
    then how many it leaves out and a hash of the whole: `model.ch=32,+14_more-3f9a0c1b2d`."""
    name = overrides.replace('"', "").replace("/", "_") or "default"
    if len(name.encode()) <= NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    parts = OVERRIDE_SEPARATOR.split(name)
    kept: list[str] = []
    while len(",".join(kept + [parts[len(kept)], f"+{len(parts)}_more-{digest}"]).encode()) <= NAME_MAX:
        kept.append(parts[len(kept)])
    if not kept:  # one override longer than a name: as many of its bytes as fit
        head = name.encode()[: NAME_MAX - len(digest) - 1].decode(errors="ignore")
        return f"{head}-{digest}"
    return ",".join(kept + [f"+{len(parts) - len(kept)}_more-{digest}"])


def run_name(path: str | None) -> str:
    """A run directory's last component, for default output folders (`none` when no run is given)."""
    return Path(str(path)).name if path else "none"


def sweep_group(sweep_dir: str | os.PathLike) -> str:
    """The W&B group of a sweep's runs: its folder's name and a hash of its absolute path, so that two
    sweeps in folders of the same name (…/a/sweep, …/b/sweep) never share a group."""
    path = Path(sweep_dir).resolve()
    return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:6]}"


# Where each job of a sweep leaves its outcome as it ends (cli.callbacks.SweepProgress): <sweep dir>/.jobs/<num>.json,
# {"num", "overrides", "status": done | failed, "reason", "output_dir" (where the job wrote one)}.
JOBS_DIR = ".jobs"


def job_records(sweep_dir: Path) -> list[dict]:
    """The outcomes a sweep's jobs recorded, in job order."""
    return sorted((json.loads(path.read_text()) for path in (Path(sweep_dir) / JOBS_DIR).glob("*.json")), key=lambda r: r["num"])


def group_choices(choices) -> dict:
    """The config-group choices of a run: neither Hydra's own nor those nested in another group's
    config (data/source@data.sources.cc3m), which the outer choice already names."""
    return {key: value for key, value in choices.items() if "/" not in key}


def run_choices(cfg: DictConfig, choices) -> dict:
    """What names a run: its config-group choices and the values of its CHOICE_KEYS, as text (as Hydra gives choices)."""
    named = group_choices(choices)
    for key in CHOICE_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            named[key] = str(value)
    return named


def atomic_write(path: Path, write, *, concurrent_writers: bool = False) -> None:
    """Calls `write(tmp)` for a temporary name beside `path`, then renames it: readers see the old file
    or the new one. A failed write (a full disk, a signal) leaves no temporary file behind.
    `concurrent_writers`: several processes may write `path` at once (a shared cache), so each writes its
    own temporary; otherwise the name is fixed, so that a killed writer's leftover is overwritten next time."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp" if concurrent_writers else f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_npy(path: Path, array: np.ndarray) -> None:
    """One array as .npy, written atomically (through a file object: np.save would add .npy to a name)."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as file:
            np.save(file, array)

    atomic_write(path, write)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def updating(path: Path):
    """Holds an exclusive lock for an update of `path` that other processes may make at the same time:
    ibq-eval and ibq-sample score into a run (a sweep's jobs side by side, or while the run trains).
    The lock is the kernel's, on `.<name>.lock` beside it, which stays for the next writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def merge_results(path: Path, results: dict[str, Any]) -> None:
    """Writes `results` into results.json, replacing the keys it names and keeping the others: what
    another writer recorded there (ibq-eval's eval/*, coco/*, imagenet/*, lpips/*) survives a re-run,
    and two writers at once both keep theirs."""
    with updating(path):
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged.update(results)
        write_json(path, merged)


def result_config(cfg: DictConfig) -> dict:
    """The resolved config without the keys that do not change the result."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in REPEATED_KEYS:
        container.pop(key, None)
    return without_non_result_keys(container)


def without_non_result_keys(container: dict) -> dict:
    """`container` (a plain config, or some of its top-level nodes) without NON_RESULT_KEYS, in place."""
    for dotted in NON_RESULT_KEYS:
        *parents, leaf = dotted.split(".")
        node = container
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return container


def without_keys(cfg: DictConfig, keys: tuple[str, ...]) -> DictConfig:
    """A resolved copy of `cfg` without the top-level `keys`."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in keys:
        container.pop(key, None)
    return OmegaConf.create(container)


def tokenizer_identity(cfg: DictConfig) -> DictConfig:
    """A stage-I run's own config: without stage II's keys (model_scale also gives them: they neither change
    the run nor identify it), and a fine-tuning parent (init_from) as an absolute path, the same from any directory."""
    own = without_keys(cfg, STAGE_II_KEYS)
    if own.get("init_from") is not None:
        own.init_from = parent_directory(own.init_from)
    return own


def stage_two_config(cfg: DictConfig, tokenizer_run: Path, tokenizer: dict, **extra) -> tuple[DictConfig, DictConfig]:
    """A stage-II run's own config: no stage-I keys, absolute paths (tokenizer_run, tokens, init_from: a resume
    from elsewhere is the same run), what the tokenizer was when training started, and `extra` top-level nodes;
    and the part of it that identifies the run (without the keys that only change how it reports)."""
    own = OmegaConf.to_container(without_keys(cfg, STAGE_I_KEYS))
    own["tokenizer_run"] = str(tokenizer_run)
    own["tokens"] = str(Path(cfg.tokens).expanduser().resolve()) if cfg.get("tokens") is not None else None
    own["tokenizer"] = tokenizer
    if own.get("init_from") is not None:
        own["init_from"] = parent_directory(own["init_from"])
    else:  # from scratch: no key at all, so that runs recorded without one still match their resumes
        own.pop("init_from", None)
    if own.get("init_from_classes") == "parent" or "init_from" not in own:  # likewise, for the parent's classes
        own.pop("init_from_classes", None)
    own.update(extra)
    identity = OmegaConf.create(own)
    for key in AR_REPORTING_KEYS:
        identity.ar_train.pop(key)
    return OmegaConf.create(own), identity


def token_grid_side(resolution: int, downsample_factor: int, tokenizer_dir: Path) -> int:
    """Tokens along each side of an image of `resolution` px that tokenizer_run's encoder makes."""
    if resolution % downsample_factor:
        raise UserError(f"data.resolution={resolution} is not a multiple of the downsampling factor {downsample_factor} "
                        f"of tokenizer_run={tokenizer_dir}")
    return resolution // downsample_factor


def sized_transformer(cfg: DictConfig, codebook_size: int, downsample_factor: int, tokenizer_dir: Path) -> DictConfig:
    """cfg.transformer with the sizes that follow its tokenizer: `auto` takes them (vocab_size: the codebook
    size; block_size: the tokens of an image at data.resolution), and a number must equal them."""
    resolution = cfg.data.resolution
    side = token_grid_side(resolution, downsample_factor, tokenizer_dir)
    follows = {"vocab_size": (codebook_size, f"the codebook of tokenizer_run={tokenizer_dir} ({codebook_size} codes)"),
               "block_size": (side * side, f"the {side}x{side} = {side * side} tokens that tokenizer_run={tokenizer_dir} "
                                           f"makes of data.resolution={resolution} px")}
    transformer = copy.deepcopy(cfg.transformer)
    for key, (size, what) in follows.items():
        if transformer[key] == "auto":
            transformer[key] = size
        elif transformer[key] != size:
            raise UserError(f"transformer.{key}={transformer[key]} differs from {what}: set transformer.{key}={size}, "
                            f"or auto to follow the tokenizer")
    return transformer


def parent_directory(init_from: str) -> str:
    return str(Path(init_from).expanduser().resolve())


def signature(cfg: DictConfig) -> str:
    canonical = json.dumps(result_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, e.g. ['quantizer.codebook_size: 1024 -> 8192']."""
    differences = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            differences += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            differences.append(f"{prefix}{key}: {a} -> {b}")
    return differences


def git_state() -> dict[str, Any]:
    """The git state of the repository the command runs in (the user's code and configs), whatever
    folder the ibq package itself was installed to."""
    outside = {"sha": None, "dirty": None, "repository": "not a git checkout"}
    git = ["git", "-C", os.getcwd()]
    try:
        top = subprocess.run([*git, "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return outside
    if top.returncode != 0:
        return outside
    repository, sha = top.stdout.splitlines()
    return {"sha": sha, "dirty": bool(dirty.stdout.strip()), "repository": repository}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class RunRecord:
    """run.json of one run directory; only rank 0 writes it."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / "run.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def start(self, cfg: DictConfig, choices: dict, overrides: list[str], kind: str, resumed_from_step: int | None) -> None:
        now = timestamp()
        self.data.setdefault("created", now)
        self.data.setdefault("resumes", [])
        if resumed_from_step is not None:
            self.data["resumes"].append({"step": resumed_from_step, "time": now, "slurm_job_id": os.environ.get("SLURM_JOB_ID")})
        self.data.update(
            kind=kind,
            signature=signature(cfg),
            choices=choices,
            overrides=overrides,
            command=sys.argv,
            git=git_state(),
            packages=package_versions(),
            python=platform.python_version(),
            host=socket.gethostname(),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            status="running",
            started=now,
            ended=None,
            error=None,
        )
        self.save()

    def check_configuration(self, signature: str) -> None:
        """Refuses a run directory that records another configuration, with or without a checkpoint."""
        recorded = self.data.get("signature")
        if recorded is not None and recorded != signature:
            overrides = " ".join(self.data.get("overrides") or []) or "none"
            raise UserError(
                f"{self.run_dir} holds a run of another configuration (signature {recorded}, overrides: {overrides}; "
                f"this run {signature}): use a new hydra.run.dir or the original overrides"
            )

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def finish(self, status: str, error: str | None = None) -> None:
        self.update(status=status, error=error, ended=timestamp())

    def save(self) -> None:
        write_json(self.path, self.data)


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step. A torn last line (a process killed or a disk
    filled mid-write) is dropped; a bad line before the last is an error naming the file and line."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (and a torn tail), so a resumed run neither loses nor repeats a line."""
        if not self.path.exists():
            return
        with updating(self.path):  # a line another process appends meanwhile is kept
            kept = [line for line in self.read() if line["step"] <= step]
            atomic_write_text(self.path, "".join(json.dumps(line, sort_keys=True) + "\n" for line in kept))

    def append(self, step: int, metrics: dict[str, Any]) -> None:
        with updating(self.path), self.path.open("a") as file:
            file.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise UserError(f"{self.path} line {number} is not JSON ({line[:60]!r}): repair or remove that line") from None
                log.warning("%s ends in a torn line (%d bytes): dropped", self.path, len(line))
        return records
