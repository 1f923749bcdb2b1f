"""Shared by the Hydra entry points: config location, one-line errors, run-directory bookkeeping."""

from __future__ import annotations

import logging
import sys
from functools import wraps
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from ibq.cli.overrides import check_group_choices, first_of_each_sweep, one_line, override_args, quote_numeric_choices
from ibq.errors import TrainingDiverged, UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
log = logging.getLogger("ibq")

OmegaConf.register_new_resolver("ibq.dirname", lambda overrides: overrides.replace('"', "") or "default", replace=True)


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def check_composition(argv: list[str], config_name: str) -> None:
    """Compose one job's config up front, so a bad key or value is one line, not Hydra's report."""
    overrides = first_of_each_sweep(override_args(argv))
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=config_name):
            compose(config_name, overrides=overrides, return_hydra_config=True)
    except Exception as error:  # Hydra raises several unrelated types for bad overrides
        raise UserError(one_line(str(error))) from None


def entry_point(hydra_main, config_name: str):
    """Console script around a Hydra main: checks the overrides first, prints user errors as one line."""

    @wraps(hydra_main)
    def cli() -> None:
        try:
            check_group_choices(sys.argv[1:], CONF_DIR)
            sys.argv[1:] = quote_numeric_choices(sys.argv[1:], CONF_DIR)
            check_composition(sys.argv[1:], config_name)
        except UserError as error:
            fail(str(error))
        hydra_main()

    return cli


def guarded(task):
    """Runs a Hydra task; a user error or divergence exits non-zero with one line. Hydra creates the
    run directory before the task starts: when the task leaves it empty (a rejected config, a dry
    run), it is removed again."""

    @wraps(task)
    def wrapper(cfg) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            task(cfg, run_dir)
        except (UserError, TrainingDiverged, FileNotFoundError) as error:
            fail(str(error), 3 if isinstance(error, TrainingDiverged) else 2)
        finally:
            if run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()

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
