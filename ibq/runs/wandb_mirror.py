"""W&B mirror of a run: offline by default; online only when W&B can be reached, otherwise a
message and offline. Its run id derives from the run's signature, so a requeued job resumes it."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)


def reachable(base_url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(base_url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


class NullMirror:
    run_id = None
    group = None
    url = None
    local_dir = None
    mode = "disabled"

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_image(self, key: str, path: Path, step: int) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        pass

    def summarize(self, results: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbMirror(NullMirror):
    def __init__(
        self,
        run_dir: Path,
        run_id: str,
        config: dict,
        project: str,
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        name: str | None = None,
        mode: str = "offline",
        base_url: str | None = None,
    ):
        import wandb

        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={mode!r} is invalid; valid: offline, online, disabled")
        base_url = base_url or os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        if mode == "online" and not reachable(base_url):
            log.warning("W&B at %s cannot be reached: logging offline instead (sync later with `wandb sync`)", base_url)
            mode = "offline"
        settings = wandb.Settings(base_url=base_url, init_timeout=60, silent=True)
        self.run = wandb.init(
            project=project, entity=entity, group=group, tags=tags, name=name, config=config, mode=mode,
            dir=str(run_dir), id=run_id, resume="allow", settings=settings,
        )
        self.mode = mode
        self.group = group
        self.run_id = self.run.id
        self.url = self.run.get_url() if mode == "online" else None
        self.local_dir = str(Path(self.run.dir).parent)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path))}, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def summarize(self, results: dict[str, Any]) -> None:
        for key, value in results.items():
            self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        # metrics.jsonl holds every metric: a W&B service that died (a signal to the whole job step)
        # costs the mirror its last lines, never the run.
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as error:
            log.warning("W&B run %s did not finish cleanly (%s: %s); metrics.jsonl has every metric", self.run_id, type(error).__name__, error)


def open_mirror(logger_cfg, run_dir: Path, run_id: str, config: dict, choices: dict, group: str | None) -> NullMirror:
    """The mirror a run's `logger` config asks for; tags carry the config-group choices."""
    if logger_cfg.kind == "none":
        return NullMirror()
    return WandbMirror(
        run_dir=run_dir,
        run_id=run_id,
        config={**config, "choices": choices},
        project=logger_cfg.project,
        entity=logger_cfg.entity,
        group=logger_cfg.group or group,
        tags=list(logger_cfg.tags or []) + [f"{k}:{v}" for k, v in sorted(choices.items()) if v is not None],
        name=logger_cfg.name or run_dir.name,
        mode=logger_cfg.mode,
        base_url=logger_cfg.base_url,
    )
