"""Codebook usage as a run artefact: the code-count histogram of each evaluation, one compact `.npy` per
step in `<run dir>/usage/`, so that collapse (few codes carrying most tokens) can be drawn after the fact."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ibq.runs.record import save_npy

USAGE_DIR = "usage"
FILE_PATTERN = re.compile(r"codes_step(\d+)\.npy$")


def usage_path(run_dir: Path, step: int) -> Path:
    return run_dir / USAGE_DIR / f"codes_step{step:07d}.npy"


def save_usage(run_dir: Path, step: int, counts: np.ndarray) -> Path:
    """Counts per code (int64, length K), written to a temporary name and renamed."""
    path = usage_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npy(path, np.asarray(counts, dtype=np.int64))
    return path


def usage_steps(run_dir: Path) -> dict[int, Path]:
    """step -> file of every evaluation's histogram, in step order."""
    found = {int(m.group(1)): p for p in (run_dir / USAGE_DIR).glob("codes_step*.npy") if (m := FILE_PATTERN.match(p.name))}
    return dict(sorted(found.items()))


def sorted_frequencies(counts: np.ndarray) -> np.ndarray:
    """Each code's share of the tokens, largest first, used codes only (rank vs frequency)."""
    counts = np.asarray(counts, dtype=np.float64)
    used = np.sort(counts[counts > 0])[::-1]
    return used / max(counts.sum(), 1.0)
