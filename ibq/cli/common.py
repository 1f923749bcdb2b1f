"""Shared by the Hydra entry points: config location, one-line errors, run-directory bookkeeping."""

from __future__ import annotations

import logging
import shutil
import sys
from functools import wraps
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from ibq.cli.overrides import check_group_choices, quote_numeric_choices
from ibq.errors import TrainingDiverged, UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
log = logging.getLogger("ibq")

OmegaConf.register_new_resolver("ibq.dirname", lambda overrides: overrides.replace('"', "") or "default", replace=True)


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def entry_point(hydra_main):
    """Console script around a Hydra main: checks group choices first, prints user errors as one line."""

    @wraps(hydra_main)
    def cli() -> None:
        try:
            check_group_choices(sys.argv[1:], CONF_DIR)
        except UserError as error:
            fail(str(error))
        sys.argv[1:] = quote_numeric_choices(sys.argv[1:], CONF_DIR)
        hydra_main()

    return cli


def guarded(task):
    """Runs a Hydra task; a user error or divergence exits non-zero with one line, and a run
    directory that this invocation created and left empty is removed again."""

    @wraps(task)
    def wrapper(cfg) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        existed_before = any(run_dir.iterdir()) if run_dir.exists() else False
        try:
            task(cfg, run_dir)
        except (UserError, TrainingDiverged, FileNotFoundError) as error:
            if not existed_before and run_dir.exists() and not any(run_dir.iterdir()):
                shutil.rmtree(run_dir)
            fail(str(error), 3 if isinstance(error, TrainingDiverged) else 2)

    return wrapper


def hydra_context() -> tuple[dict, list[str], str | None]:
    """Config-group choices, the job's overrides, and the sweep directory's name in multirun mode."""
    hydra = HydraConfig.get()
    choices = {k: v for k, v in hydra.runtime.choices.items() if not k.startswith("hydra/")}
    group = Path(hydra.sweep.dir).name if hydra.mode == RunMode.MULTIRUN else None
    return choices, list(hydra.overrides.task), group


def save_hydra_files(cfg, run_dir: Path) -> None:
    """What Hydra would write to .hydra/, written only once the config has been checked."""
    hydra = HydraConfig.get()
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hydra)}), out / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hydra.overrides.task)), out / "overrides.yaml")
