"""W&B mirror of a run: offline by default; online only when W&B answers and accepts the run,
otherwise a message and offline. Its run id derives from the run's signature, so a requeued job resumes it."""

from __future__ import annotations

import logging
import math
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ibq.runs.record import LAUNCH_CHOICES
from ibq.runs.usage import sorted_frequencies

log = logging.getLogger(__name__)
HISTOGRAM_BINS = 512  # W&B's limit for a histogram
ANSWER_TIMEOUT_S = 5.0  # for W&B's server to answer one HTTP request
INIT_TIMEOUT_S = 60  # for wandb.init online, once the server has answered
REQUEST_TIMEOUT_S = 30  # for each of W&B's API requests
FINISH_TIMEOUT_S = 300  # for the last uploads at the end; what is left stays on disk for `wandb sync`


def answers(base_url: str, timeout: float = ANSWER_TIMEOUT_S) -> bool:
    """Whether W&B's server answers an HTTP request within `timeout` (any status counts): a server that
    accepts connections and never answers does not."""
    try:
        urllib.request.urlopen(urllib.request.Request(base_url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # refused, unresolvable, timed out; a malformed URL
        return False
    return True


def offline_reason(error: Exception) -> str:
    text = " ".join(str(error).split())[:200]
    if "api_key" in text.lower() or "api key" in text.lower():
        return "no W&B API key: set WANDB_API_KEY or run `wandb login`"
    return f"{type(error).__name__}: {text}"


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

    def log_code_usage(self, counts, step: int) -> None:
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
        job_type: str = "train",
    ):
        import wandb

        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={mode!r} is invalid; valid: offline, online, disabled")
        base_url = base_url or os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        if mode == "online" and not answers(base_url):
            log.warning("W&B at %s cannot be reached: logging offline instead (no answer within %.0f s; sync later with `wandb sync`)", base_url, ANSWER_TIMEOUT_S)
            mode = "offline"
        settings = wandb.Settings(
            base_url=base_url, init_timeout=INIT_TIMEOUT_S, login_timeout=REQUEST_TIMEOUT_S,
            x_graphql_timeout_seconds=REQUEST_TIMEOUT_S, finish_timeout=FINISH_TIMEOUT_S, silent=True,
        )
        arguments = dict(
            project=project, entity=entity, group=group, tags=tags, name=name, config=config, job_type=job_type,
            dir=str(run_dir), id=run_id, resume="allow", settings=settings,
        )
        try:
            self.run = wandb.init(mode=mode, **arguments)
        except Exception as error:  # wandb raises UsageError, CommError, AuthenticationError, ...
            if mode != "online":
                raise
            log.warning("W&B cannot log online (%s): logging offline instead (sync later with `wandb sync`)", offline_reason(error))
            mode = "offline"
            self.run = wandb.init(mode=mode, **arguments)
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

    def log_code_usage(self, counts, step: int) -> None:
        """The code-count histogram (codes binned by index, at most W&B's 512 bins) and the sorted usage
        as a log-log line of rank vs frequency over the used codes: the picture of codebook collapse."""
        import numpy as np
        import wandb

        counts = np.asarray(counts, dtype=np.int64)
        edges = np.linspace(0, len(counts), min(len(counts), HISTOGRAM_BINS) + 1).round().astype(np.int64)
        binned = np.add.reduceat(counts, edges[:-1])
        frequencies = sorted_frequencies(counts)
        points = [[math.log10(rank), math.log10(share)] for rank, share in enumerate(frequencies, start=1)]
        line = wandb.plot.line(wandb.Table(columns=["log10 rank", "log10 frequency"], data=points), "log10 rank", "log10 frequency",
                               title=f"sorted code usage at step {step} (log-log, {len(frequencies)} of {len(counts)} codes used)")
        self.run.log({"codebook/usage": wandb.Histogram(np_histogram=(binned, edges)), "codebook/usage_sorted": line}, step=step)

    def summarize(self, results: dict[str, Any]) -> None:
        for key, value in results.items():
            self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        """End the W&B run with its records on disk. run.finish() returns once W&B's service has the run's
        last record, when it may not have written the run's file yet (offline: the .wandb record, found
        empty under load); wandb.teardown() stops the service, which closes the file first, so the record is
        complete before a requeue ends the job step or anything reads it. The next run starts a new service."""
        import wandb

        # metrics.jsonl holds every metric: a W&B service that died (a signal to the whole job step)
        # costs the mirror its last lines, never the run.
        try:
            self.run.finish(exit_code=exit_code)
            wandb.teardown()
        except Exception as error:
            log.warning("W&B run %s did not finish cleanly (%s: %s); metrics.jsonl has every metric", self.run_id, type(error).__name__, error)


def varied_choices(choices: dict, overrides: list[str]) -> dict:
    """The config-group choices a run's overrides set (on the command line or through its sweep): those that
    differ from the defaults or vary in the sweep, without the ones that only say where or how it ran."""
    keys = {override.split("=", 1)[0].lstrip("+~") for override in overrides if "=" in override}
    return {k: v for k, v in sorted(choices.items()) if k in keys and k not in LAUNCH_CHOICES and v is not None}


def offline_folders(run_dir: Path, run_id: str | None) -> list[Path]:
    """Every offline W&B folder of this run: a resumed run adds one per start, all with the same id."""
    if run_id is None:
        return []
    return sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))


def run_tags(logger_cfg, choices: dict, overrides: list[str]) -> list[str]:
    """The logger's own tags and the choices that were set rather than left at their defaults."""
    return list(logger_cfg.tags or []) + [f"{k}:{v}" for k, v in varied_choices(choices, overrides).items()]


def provenance(choices: dict, git: dict) -> dict:
    """What W&B's filters need beside the resolved config: the config-group choices and the git state."""
    return {"choices": choices, "git": {"commit": git.get("sha"), "dirty": git.get("dirty")}}


def open_mirror(logger_cfg, run_dir: Path, run_id: str, config: dict, choices: dict, overrides: list[str], git: dict,
                group: str | None, job_type: str = "train") -> NullMirror:
    """The mirror a run's `logger` config asks for. Its config also holds the choices and the git state
    (for W&B's filters); its tags, the choices that were set rather than left at their defaults."""
    if logger_cfg.kind == "none":
        return NullMirror()
    return WandbMirror(
        run_dir=run_dir,
        run_id=run_id,
        config={**config, **provenance(choices, git)},
        project=logger_cfg.project,
        entity=logger_cfg.entity,
        group=logger_cfg.group or group,
        tags=run_tags(logger_cfg, choices, overrides),
        name=logger_cfg.name or run_dir.name,
        mode=logger_cfg.mode,
        base_url=logger_cfg.base_url,
        job_type=job_type,
    )


def evaluation_run_id(train_run_id: str, job_type: str, step: int) -> str:
    """Stable per training run, kind and step: evaluating the same checkpoint again resumes its W&B run."""
    return f"{train_run_id}-{job_type}-{step}"


def open_evaluation_mirror(run_dir: Path, train_config: dict, record: dict, train_run_id: str, job_type: str, step: int,
                           mode: str) -> WandbMirror:
    """An evaluation's own W&B run (job_type `eval` or `sample`) beside its training run: the same project,
    entity and group, the training run's config, choices and git state plus `train_run_id`, so that W&B's
    filters and the Report group it with the run it evaluates. `record` is the training run's run.json."""
    logger_cfg = OmegaConf.create(train_config["logger"])
    name = logger_cfg.name or run_dir.name
    return WandbMirror(
        run_dir=run_dir,
        run_id=evaluation_run_id(train_run_id, job_type, step),
        config={**train_config, **provenance(record.get("choices") or {}, record.get("git") or {}),
                "train_run_id": train_run_id, "evaluated_step": step},
        project=logger_cfg.project,
        entity=logger_cfg.entity,
        group=logger_cfg.group or (record.get("wandb") or {}).get("group"),
        tags=run_tags(logger_cfg, record.get("choices") or {}, record.get("overrides") or []),
        name=f"{name}-{job_type}-{step}",
        mode=mode,
        base_url=logger_cfg.base_url,
        job_type=job_type,
    )
