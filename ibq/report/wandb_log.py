"""The sweep's plots and table logged to W&B, as one `analysis` run in the sweep's group (offline unless
asked otherwise and W&B is reachable). Its id derives from the group, so logging again updates it."""

from __future__ import annotations

import logging
from pathlib import Path

from ibq.ledger.wandb_source import online_problem
from ibq.report.plot import slug
from ibq.report.table import Table

log = logging.getLogger(__name__)


def log_analysis(table: Table, plots: list[Path], group: str, project: str, entity: str | None, directory: Path, mode: str) -> str | None:
    """Returns the W&B run's local directory (offline) or URL (online); None when mode is 'disabled'."""
    if mode == "disabled":
        return None
    if mode == "online":
        problem = online_problem()
        if problem:
            print(f"W&B: {problem}; logging the plots offline instead")
            mode = "offline"
    import wandb

    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=project, entity=entity, group=group, job_type="analysis", name=f"{group} analysis",
        id=f"analysis-{slug(group)}", resume="allow", dir=str(directory), mode=mode,
        settings=wandb.Settings(silent=True, init_timeout=60),
    )
    try:
        run.log({f"plots/{path.stem}": wandb.Image(str(path)) for path in plots})
        run.log({"table": wandb.Table(columns=table.header, data=table.body())})
        where = run.get_url() if mode == "online" else str(Path(run.dir).parent)
    finally:
        run.finish()
    return where
