"""Runs as the ledger sees them: one record per run directory (run.json, results.json, .hydra/config.yaml),
or per W&B run. Table, plots and reports take these records and do not care where they came from."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

# Folders inside a run directory that never hold another run.
RUN_INTERNALS = {"wandb", "checkpoints", "media", ".hydra", "plots", "report", "analysis", ".submitit"}


@dataclass
class Run:
    name: str
    location: str  # a directory, or a W&B run path
    status: str  # running | completed | failed | preempted (as recorded; liveness is judged elsewhere)
    signature: str | None
    choices: dict[str, str]
    config: dict[str, Any]  # flattened: dotted key -> value
    results: dict[str, Any] | None
    record: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def completed(self) -> bool:
        return self.status == "completed" and self.results is not None

    @property
    def error(self) -> str | None:
        return self.record.get("error")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}, 'c': [1, 2]} -> {'a.b': 1, 'c': '[1, 2]'} (lists as JSON text, so values are hashable)."""
    if isinstance(node, dict):
        flat = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(node, list):
        return {prefix[:-1]: json.dumps(node, default=str)}
    return {prefix[:-1]: node}


def load_json(path: Path) -> tuple[dict | None, str | None]:
    """The JSON object in `path`, or None and why not (missing, unreadable, not an object)."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return None, f"{type(error).__name__}: {error}"
    return (content, None) if isinstance(content, dict) else (None, f"a JSON {type(content).__name__}, not an object")


def read_json(path: Path) -> dict | None:
    return load_json(path)[0]


def read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        return {}
    cfg = OmegaConf.load(path)
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that needs Hydra's runtime: compare the raw text instead
        container = OmegaConf.to_container(cfg, resolve=False)
    return flatten(container)


def load_run(run_dir: Path) -> Run | None:
    record = read_json(run_dir / "run.json")
    if record is None:
        return None
    results = read_json(run_dir / "results.json")
    choices = {k: str(v) for k, v in (record.get("choices") or {}).items() if v is not None}
    return Run(
        name=run_dir.name,
        location=str(run_dir),
        status=record.get("status") or "unknown",
        signature=record.get("signature"),
        choices=choices,
        config=read_config(run_dir),
        results=results,
        record=record,
        path=run_dir,
    )


# What one ibq-sample sampling was (keys of its results.json), the config of its row in a comparison: the AR run
# (as ar_run: a training run's run_dir names no result) and its step, the resolved sampling settings, seed and
# counts, and the images its gFID was taken against.
SAMPLING_KEYS = ("run_dir", "step", "sampling", "seed", "classes", "samples_per_class", "samples", "gfid/reference",
                 "gfid/reference_samples")


def load_sampling(directory: Path) -> Run | None:
    """The folder of one ibq-sample job as a run of a comparison: what it sampled as its config, its gFID and IS
    as its results (None where they were not scored: metrics.fid=false, or one part of several). None where
    the folder holds no finished sampling."""
    record = read_json(directory / "results.json")
    if record is None or "npz" not in record or "sampling" not in record:
        return None
    scores = {key: value for key, value in record.items() if key.split("/")[0] in ("gfid", "is") or key == "eval/samples"}
    scored = any(record.get(metric) is not None for metric in ("gfid", "is"))
    return Run(
        name=directory.name,
        location=str(directory),
        status="completed",
        signature=None,
        choices={},
        config=flatten({"ar_run" if key == "run_dir" else key: record[key] for key in SAMPLING_KEYS if key in record}),
        results=scores if scored else None,
        record=record,
        path=directory,
    )


def sampling_dirs(root: Path) -> list[Path]:
    """Every folder below `root` where an ibq-sample job wrote its samples.npz and results.json."""
    return sorted(npz.parent for npz in Path(root).rglob("samples.npz") if (npz.parent / "results.json").is_file())


def run_dirs(root: Path) -> list[Path]:
    """Every directory below `root` (itself included) that holds a run.json; run folders are not searched further."""
    found = []
    for current, dirs, files in os.walk(root):
        if "run.json" in files:
            found.append(Path(current))
            dirs[:] = []
        else:
            dirs[:] = sorted(d for d in dirs if d not in RUN_INTERNALS)
    return found


def discover(root: Path) -> list[Run]:
    return [run for run in (load_run(d) for d in run_dirs(root)) if run is not None]


def completed_runs(roots: list[Path]) -> dict[str, Path]:
    """signature -> directory of a completed run (with results.json) below any of `roots`; the newest wins."""
    index: dict[str, tuple[str, Path]] = {}
    for root in roots:
        if not root.is_dir():
            continue
        for run_dir in run_dirs(root):
            record = read_json(run_dir / "run.json") or {}
            sig = record.get("signature")
            if sig and record.get("status") == "completed" and (run_dir / "results.json").exists():
                ended = record.get("ended") or ""
                if sig not in index or ended > index[sig][0]:
                    index[sig] = (ended, run_dir)
    return {sig: path for sig, (_, path) in index.items()}


def completed_run(signature: str, roots: list[Path], exclude: Path | None = None) -> Path | None:
    """The directory of a completed run with this signature below `roots`, other than `exclude`.

    The training entry point can call this before it builds anything, to skip a job that already
    finished elsewhere (a relaunched sweep then re-runs only what is missing)."""
    for root in roots:
        if not root.is_dir():
            continue
        for run_dir in run_dirs(root):
            if exclude is not None and run_dir.resolve() == exclude.resolve():
                continue
            record = read_json(run_dir / "run.json") or {}
            if record.get("signature") == signature and record.get("status") == "completed" and (run_dir / "results.json").exists():
                return run_dir
    return None
