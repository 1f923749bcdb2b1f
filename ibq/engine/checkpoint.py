"""Checkpoints are written to a temporary name and renamed, so a kill never leaves a torn file, and
only when every tensor in them is finite, so the checkpoint a diverged run names is one to resume from."""

from __future__ import annotations

import codecs
import math
import pickle
import random
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ibq.config import build, one_line, shell_override
from ibq.engine.distributed import any_rank, gather_objects
from ibq.errors import TrainingDiverged, UserError, steps_text
from ibq.runs.record import RunRecord, atomic_write

CHECKPOINT = Path("checkpoints") / "last.pt"  # a run directory's checkpoint
# The kinds of run a command loads: the apps that make one, and what its checkpoint holds besides step and config.
RUN_KINDS = {
    "tokenizer": ("ibq-train or ibq-import tokenizer", ("tokenizer", "ema")),
    "generator": ("ibq-train-ar or ibq-import generator", ("model",)),
    "any": ("ibq-train, ibq-train-ar or ibq-import", ()),
}
TOKENIZER_WEIGHTS = {"ema": "ema", "live": "tokenizer"}  # which weights -> the checkpoint entry holding them


NOT_TORCH = "it is not what torch.save writes (a torn file, or another kind)"


def torch_load(path: Path, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as error:
        if not mmap or "mmap" not in str(error):
            raise
    # mmap reads torch.save's zip format (torch >= 1.6) only: read an older file, or one of no torch at all, whole
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: Path, mmap: bool = False) -> Any:
    """A checkpoint read as data (weights_only): loading it runs no code from the file, whoever wrote it.
    Checkpoints written before numpy's RNG state was kept as numbers hold it as a numpy array, which is
    allowed for them. `mmap`: tensors are read from the file when used."""
    for allowed_numpy in (False, True):
        try:
            return torch_load(path, mmap)
        except (KeyError, EOFError) as error:  # from the reader of torch's pre-zip format, on bytes it cannot parse
            raise pickle.UnpicklingError(NOT_TORCH) from error
        except pickle.UnpicklingError as error:
            named = re.search(r"GLOBAL ([\w.]+)", str(error))
            if named is None:  # torch's message would suggest weights_only=False, which a torn file does not mend
                raise pickle.UnpicklingError(NOT_TORCH) from None
            if allowed_numpy or not named.group(1).startswith(LEGACY_NUMPY_GLOBALS):
                raise pickle.UnpicklingError(f"it holds {named.group(1)}, which is no tensor or Python data, and is read as data only") from None
        torch.serialization.add_safe_globals(legacy_numpy_globals())


# What a numpy array pickles into (the RNG state of checkpoints written before it was kept as numbers);
# codecs.encode writes its bytes, and is allowed by default since torch 2.5.
LEGACY_NUMPY_GLOBALS = ("numpy.", "_codecs.encode")


def legacy_numpy_globals() -> list:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), codecs.encode]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def kept_path(checkpoint: Path, step: int) -> Path:
    """Where the checkpoint of `step` is kept beside `checkpoint` (train.keep_every, ar_train.keep_every)."""
    return checkpoint.with_name(f"step{step:07d}.pt")


KEPT_NAME = re.compile(r"step(\d+)\.pt")


def kept_checkpoints(folder: Path) -> dict[int, Path]:
    """The checkpoints kept in a run's checkpoints/ folder, by step, in step order."""
    found = {int(match[1]): file for file in folder.iterdir() if (match := KEPT_NAME.fullmatch(file.name))} if folder.is_dir() else {}
    return dict(sorted(found.items()))


# What a kept checkpoint holds: what evaluation, sampling and fine-tuning read (the weights: live, EMA and the
# discriminator's), not the optimizer and RNG state only a resume needs, which reads last.pt: a third to a half of the size.
KEPT_ENTRIES = ("step", "signature", "config", "tokenizer", "ema", "discriminator", "model")


def keep_checkpoint(checkpoint: Path, step: int) -> Path:
    """The weights of the checkpoint just written (KEPT_ENTRIES), kept as checkpoints/step<step>.pt."""
    state = read_checkpoint(checkpoint, mmap=True)
    kept = kept_path(checkpoint, step)
    save_checkpoint(kept, {key: state[key] for key in KEPT_ENTRIES if key in state})
    return kept


def read_error(path: Path, error: Exception) -> str:
    return f"checkpoint {path} cannot be read ({type(error).__name__}: {one_line(str(error)) or 'empty'})"


def saved_step(checkpoint: Path) -> int:
    """The step a checkpoint was written at, read memory-mapped (its tensors stay on disk)."""
    try:
        return int(read_checkpoint(checkpoint, mmap=True)["step"])
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        raise UserError(read_error(checkpoint, error)) from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A run's own checkpoint, to resume from."""
    try:
        state = read_checkpoint(path)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        raise UserError(f"{read_error(path, error)}: restore it, or move it away to start this run from step 0") from None
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"{path} is not an ibq checkpoint (no step): restore it, or move it away to start this run from step 0")
    return state


def ema_weights(ema_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tokenizer weights of a checkpoint's EMA module (its `ema` entry), under the tokenizer's own
    names: the module keeps the averaged tokenizer as its `shadow` submodule."""
    return {key.removeprefix("shadow."): value for key, value in ema_state.items() if key.startswith("shadow.")}


@dataclass
class LoadedRun:
    """A run's checkpoint, memory-mapped: tensors are read when they are used."""

    checkpoint_path: Path
    run_dir: Path | None  # None: a checkpoint file outside a run directory
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def signature(self) -> str | None:
        return self.state.get("signature")

    @property
    def config(self) -> DictConfig:
        """The resolved config the checkpoint was trained with (without the keys that only say where or how)."""
        return OmegaConf.create(self.state["config"])

    def composed_config(self) -> DictConfig:
        """The run's composed config (.hydra/config.yaml, with its logger and interpolations); for a checkpoint
        outside a run, the resolved one it holds."""
        composed = self.run_dir / ".hydra" / "config.yaml" if self.run_dir is not None else None
        return OmegaConf.load(composed) if composed is not None and composed.is_file() else self.config

    def tokenizer_weights(self, weights: str = "ema") -> dict[str, torch.Tensor]:
        """The tokenizer's `weights` (ema or live) under the tokenizer's own names."""
        state = self.state[TOKENIZER_WEIGHTS[weights]]
        return ema_weights(state) if weights == "ema" else dict(state)

    def tokenizer(self, device: torch.device, weights: str = "ema", config: DictConfig | None = None) -> torch.nn.Module:
        """The tokenizer built from `config` (the run's own when None) with its `weights`, in eval mode, frozen."""
        config = self.config if config is None else config
        tokenizer = build(config.model, quantizer=build(config.quantizer))
        tokenizer.load_state_dict(self.tokenizer_weights(weights))
        return tokenizer.to(device).eval().requires_grad_(False)


def locate_run(path: str | Path | None, key: str, kind: str = "tokenizer", outside_a_run: bool = False) -> tuple[Path, Path | None]:
    """The checkpoint file of a run directory (its checkpoints/last.pt) or, with `outside_a_run`, a checkpoint
    file itself, and the run directory it lies in (None outside a run), without reading it: cheap enough for
    the checks before Hydra makes a job's folder. Every problem is one line naming `key`, the setting that gave
    the path, and the `kind` of run (RUN_KINDS) it must name."""
    app = RUN_KINDS[kind][0]
    if path is None:
        raise UserError(f"{key} is required: the run directory of an {app} run")
    path = Path(path).expanduser().resolve()
    if outside_a_run and path.is_file():
        parent = path.parent.parent
        return path, parent if path.parent.name == "checkpoints" and (parent / "run.json").is_file() else None
    if not path.is_dir():
        what = "is a file" if path.is_file() else "does not exist"
        target = f"a checkpoint file or the run directory of an {app} run" if outside_a_run else f"the run directory of an {app} run"
        raise UserError(f"{key}={path} {what}: point it at {target}")
    if not (path / CHECKPOINT).is_file():
        raise UserError(f"{key}={path} has no checkpoint ({CHECKPOINT}): train it with {app} first, or pick another run")
    return path / CHECKPOINT, path


def checkpoint_at_step(path: str | Path | None, step: int, key: str, kind: str) -> Path:
    """The checkpoint of `step` of the run at `path` (which `key` gave; a run of `kind`, RUN_KINDS): the one
    kept at that step, or last.pt where it is of that step. Else one line with the steps the run has."""
    last, run_dir = locate_run(path, key, kind)
    kept = kept_path(last, step)
    if kept.is_file():
        return kept
    last_step = saved_step(last)
    if last_step == step:
        return last
    steps = list(kept_checkpoints(last.parent))
    kept_steps = f"it kept steps {steps_text(steps)}" if steps else "it kept none (keep_every)"
    raise UserError(f"step={step}: {run_dir} has no checkpoint of that step; {kept_steps}, and last.pt is step {last_step}")


def load_run(path: str | Path | None, key: str, kind: str = "tokenizer", outside_a_run: bool = False) -> LoadedRun:
    """The run that `locate_run` finds, its checkpoint checked to hold what a run of `kind` (RUN_KINDS) holds."""
    app, entries = RUN_KINDS[kind]
    checkpoint, run_dir = locate_run(path, key, kind, outside_a_run)
    path = Path(path).expanduser().resolve()
    try:
        state = read_checkpoint(checkpoint, mmap=True)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        raise UserError(read_error(checkpoint, error)) from None
    missing = [entry for entry in ("step", "config", *entries) if not isinstance(state, dict) or entry not in state]
    if missing:
        raise UserError(f"{key}={path} is not an {app} run: {checkpoint} lacks {', '.join(missing)}")
    return LoadedRun(checkpoint, run_dir, state)


@dataclass
class Parent:
    """The run (trained here or imported) whose weights start a fine-tuning run (init_from)."""

    run: LoadedRun
    overrides: list[str]  # its command line's overrides: those that shaped its model, a new run repeats

    def record(self) -> dict:
        """What the fine-tuning run's run.json keeps of its parent."""
        return {"run_dir": str(self.run.run_dir), "checkpoint": str(self.run.checkpoint_path), "signature": self.run.signature,
                "step": self.run.step, "imported": self.run.state["config"].get("imported")}

    def check_fits(self, weights: dict[str, torch.Tensor], model: torch.nn.Module, what: str) -> None:
        """The parent's `weights` load into `model` (this run's `what`); else one line with the parent's overrides."""
        check_tensors(
            {key: tuple(value.shape) for key, value in weights.items()},
            {key: tuple(value.shape) for key, value in model.state_dict().items()},
            f"init_from={self.run.run_dir} does not fit this run's {what} (the parent's overrides, as a shell takes "
            f"them: {' '.join(map(shlex.quote, self.overrides)) or 'none'})",
        )


def locate_parent(init_from: str | Path, kind: str) -> Path:
    """init_from's checkpoint: a run's last.pt, or one it kept (<run>/checkpoints/step<N>.pt), whose run (its
    overrides, its record) the fine-tuning run names as its parent."""
    checkpoint, run_dir = locate_run(init_from, "init_from", kind, outside_a_run=True)
    if run_dir is None:
        raise UserError(f"init_from={checkpoint} lies outside a run directory: give a run directory, or a checkpoint it kept "
                        f"(<run>/checkpoints/step<N>.pt)")
    return checkpoint


def fine_tuning_parent(init_from: str | None, kind: str, run_dir: Path) -> tuple[Parent | None, dict | None]:
    """init_from's run of `kind` (RUN_KINDS), with the overrides its run.json lists, whose weights start the
    run in `run_dir`, and what that run's run.json keeps of it; (None, None) for a run from scratch. A run
    that resumes from its own checkpoint reads no parent: the parent may have trained on, moved or gone
    since, and the record keeps the one the run started from."""
    if init_from is None:
        return None, None
    if (run_dir / CHECKPOINT).is_file():
        return None, RunRecord(run_dir).data.get("parent")
    run = load_run(locate_parent(init_from, kind), "init_from", kind, outside_a_run=True)
    parent = Parent(run, RunRecord(run.run_dir).data.get("overrides") or [])
    return parent, parent.record()


def non_finite_tensors(state: Any, name: str = "") -> list[str]:
    """Names of the floating-point tensors in a nested state (weights, EMA, optimizer moments) that hold
    a NaN or an infinity. One host synchronisation for the whole state: call it at checkpoints only."""
    tensors: list[tuple[str, torch.Tensor]] = []

    def collect(value: Any, prefix: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex():
                tensors.append((prefix, value))
        elif isinstance(value, dict):
            for key, item in value.items():
                collect(item, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                collect(item, f"{prefix}.{index}")

    collect(state, name)
    if not tensors:
        return []
    device = tensors[0][1].device
    finite = torch.stack([tensor.isfinite().all().to(device) for _, tensor in tensors]).tolist()
    return [name for (name, _), ok in zip(tensors, finite) if not ok]


def stop_if_state_not_finite(step: int, state: dict[str, Any], checkpoint: Path, device: torch.device) -> None:
    """Every rank stops together, before saving, when the state to be checkpointed holds non-finite
    tensors on any of them: last.pt keeps the previous, finite checkpoint."""
    bad = non_finite_tensors({key: value for key, value in state.items() if not key.startswith("rng")})
    if any_rank(bool(bad), device):
        previous = load_checkpoint(checkpoint)["step"] if checkpoint.exists() else None
        kept = f"the last good checkpoint is {checkpoint} (step {previous})" if previous is not None else "no checkpoint was written yet"
        where = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "") if bad else "on another rank"
        raise TrainingDiverged(f"non-finite values at step {step} in {where}: not checkpointed, training stopped; {kept}")


def rng_state() -> dict[str, Any]:
    # numpy's state as Python numbers: a pickled ndarray names numpy's module of the writer's major version
    # (numpy._core in 2.x), which numpy 1.x cannot load, and torch.load(weights_only=True) refuses it.
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), position, has_gauss, cached_gaussian],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]  # a list, or numpy's own tuple in checkpoints written before
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _diverged(step: int, bad: dict[str, float], checkpoint: Path, last_good: int | None) -> TrainingDiverged:
    kept = f"the last good checkpoint is {checkpoint} (step {last_good})" if last_good else "no checkpoint was written yet"
    where = ", ".join(f"{k}={v}" for k, v in bad.items()) or "on another rank"
    return TrainingDiverged(f"non-finite loss at step {step} ({where}): training stopped; {kept}")


class DivergenceWatch:
    """Every rank stops together when a loss was non-finite on any of them, without waiting for the
    device at every step: `observe` keeps, on the device, the first step whose losses were non-finite
    and those losses; `check` reads them on the host (and agrees across ranks) only when called: at log
    steps and before every checkpoint, so no checkpoint ever holds weights updated from a non-finite loss."""

    def __init__(self, checkpoint: Path, last_good: int | None, device: torch.device):
        self.checkpoint, self.last_good, self.device = checkpoint, last_good, device
        self.first_step = torch.zeros((), dtype=torch.long, device=device)  # 0: every loss finite so far
        self.losses: dict[str, torch.Tensor] = {}

    def observe(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        values = torch.stack([value.detach().double() for value in losses.values()])
        first_bad = (self.first_step == 0) & ~torch.isfinite(values).all()
        self.first_step = torch.where(first_bad, step, self.first_step)
        for name, value in zip(losses, values):
            self.losses[name] = torch.where(first_bad, value, self.losses.get(name, value.new_zeros(())))

    def check(self, step: int) -> None:
        """At `step`, every rank stops together when any of them saw a non-finite loss since the start."""
        first_step = int(self.first_step)
        if any_rank(first_step > 0, self.device):
            bad = {name: value for name, value in zip(self.losses, torch.stack(list(self.losses.values())).tolist())
                   if not math.isfinite(value)}
            raise _diverged(first_step or step, bad, self.checkpoint, self.last_good)

    def saved(self, step: int) -> None:
        self.last_good = step


def rng_entries() -> dict[str, Any]:
    """A checkpoint's RNG entries (collective): rank 0's state, and every rank's when there are several."""
    rngs = gather_objects(rng_state())
    return {"rng": rngs[0], "rng_by_rank": rngs} if len(rngs) > 1 else {"rng": rngs[0]}


def restore_rng(state: dict[str, Any], rank: int, world_size: int) -> None:
    """This rank's RNG state from a checkpoint (rank 0's when the job has another number of ranks)."""
    by_rank = state.get("rng_by_rank")
    set_rng_state(by_rank[rank] if by_rank and len(by_rank) == world_size else state["rng"])


def foreign_checkpoint(path: Path, saved_signature: str, signature: str, changed: list[str], extends: str | None = None) -> UserError:
    """The error for a run directory whose checkpoint another configuration wrote. `extends`: the key that
    would train that run on, where more steps are all that differ (stage I's train.extend_from)."""
    hint = "give the run another folder (hydra.run.dir=…) or the original overrides"
    if extends is not None:
        hint += f"; to train that run on for more steps, in another folder: hydra.run.dir=<folder> {shell_override(extends, path.parent.parent)}"
    return UserError(
        f"{path} belongs to another configuration (signature {saved_signature}, this run {signature}; "
        f"differs in {'; '.join(changed[:3]) or 'unknown keys'}): {hint}"
    )


def check_tensors(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], what: str, prefix: str = "") -> None:
    """Every expected tensor present with its shape, and nothing else; else one line with a few examples."""
    def shape(value: tuple[int, ...]) -> str:
        return "(" + ", ".join(map(str, value)) + ")"

    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    wrong = [key for key in expected if key in found and tuple(found[key]) != tuple(expected[key])]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(f'{prefix}{k} {shape(expected[k])}' for k in missing[:3])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}, e.g. {', '.join(prefix + k for k in unexpected[:3])}")
    if wrong:
        problems.append("; ".join(f"{prefix}{k} is {shape(found[k])} but {shape(expected[k])} was expected" for k in wrong[:3]))
    if problems:
        raise UserError(f"{what}: {'; '.join(problems)}")
