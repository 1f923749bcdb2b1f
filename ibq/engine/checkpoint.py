"""Checkpoints are written to a temporary name and renamed, so a kill never leaves a torn file."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ibq.engine.distributed import any_rank, gather_objects
from ibq.errors import TrainingDiverged, UserError


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stop_if_not_finite(step: int, losses: dict[str, torch.Tensor], checkpoint: Path, last_good: int | None, device: torch.device) -> None:
    """Every rank stops together when a loss is non-finite on any of them."""
    bad = {name: value.item() for name, value in losses.items() if not torch.isfinite(value)}
    if any_rank(bool(bad), device):
        raise _diverged(step, bad, checkpoint, last_good)


def _diverged(step: int, bad: dict[str, float], checkpoint: Path, last_good: int | None) -> TrainingDiverged:
    kept = f"the last good checkpoint is {checkpoint} (step {last_good})" if last_good else "no checkpoint was written yet"
    where = ", ".join(f"{k}={v}" for k, v in bad.items()) or "on another rank"
    return TrainingDiverged(f"non-finite loss at step {step} ({where}): training stopped; {kept}")


class DivergenceWatch:
    """`stop_if_not_finite` without waiting for the device at every step: `observe` keeps, on the
    device, the first step whose losses were non-finite and those losses; `check` reads them on the
    host (and agrees across ranks) only when called: at log steps and before every checkpoint, so no
    checkpoint ever holds weights updated from a non-finite loss."""

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


def foreign_checkpoint(path: Path, saved_signature: str, signature: str, changed: list[str]) -> UserError:
    """The error for a run directory whose checkpoint another configuration wrote."""
    return UserError(
        f"{path} belongs to another configuration (signature {saved_signature}, this run {signature}; "
        f"differs in {'; '.join(changed[:3]) or 'unknown keys'}): use a new run_dir or the original overrides"
    )
