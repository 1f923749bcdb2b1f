"""What a training run writes besides its checkpoints: run.json, metrics.jsonl and the W&B mirror.
Only rank 0 writes them; on the other ranks a session records nothing."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from ibq.engine.distributed import Ranks, shutdown
from ibq.engine.preemption import RequeueRefused, StoppedAtCheckpoint
from ibq.errors import TrainingDiverged
from ibq.runs.record import MetricsLog, RunRecord
from ibq.runs.wandb_mirror import NullMirror, open_mirror


class RunSession:
    def __init__(self, run_dir: Path, ranks: Ranks):
        self.run_dir, self.is_main = run_dir, ranks.is_main
        self.record: RunRecord | None = None
        self.metrics_log: MetricsLog | None = None
        self.mirror = NullMirror()

    def open(self, cfg: DictConfig, choices: dict, overrides: list[str], kind: str, start_step: int, run_id: str,
             group: str | None, **fields) -> None:
        """Starts (or, resumed at `start_step`, continues) the records; `fields` go into run.json."""
        if not self.is_main:
            return
        (self.run_dir / "media").mkdir(parents=True, exist_ok=True)
        self.record = RunRecord(self.run_dir)
        self.record.start(cfg, choices, overrides, kind=kind, resumed_from_step=start_step or None)
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl")
        self.metrics_log.truncate_after(start_step)
        self.mirror = open_mirror(cfg.logger, self.run_dir, run_id, OmegaConf.to_container(cfg, resolve=True), choices, overrides,
                                  self.record.data["git"], group)
        mirror = self.mirror
        self.record.update(
            wandb={"id": mirror.run_id, "url": mirror.url, "dir": mirror.local_dir, "mode": mirror.mode, "group": mirror.group},
            **fields,
        )

    def log(self, step: int, metrics: dict) -> None:
        if self.is_main:
            self.metrics_log.append(step, metrics)
            self.mirror.log(metrics, step)

    def logged(self) -> list[dict]:
        return self.metrics_log.read() if self.is_main else []

    def completed(self, results: dict) -> None:
        if self.is_main:
            self.record.finish("completed")
            self.mirror.summarize(results)
            self.mirror.finish()

    def failed(self, message: str) -> None:
        if self.is_main:
            self.record.finish("failed", message)
            self.mirror.finish(exit_code=1)

    def run(self, train: Callable[[], dict]) -> dict:
        """Runs `train` on every rank; its results complete the records, an exception fails them."""
        with self.failures_recorded():
            results = train()
        self.completed(results)
        shutdown()
        return results

    @contextmanager
    def failures_recorded(self):
        """A run that raises ends as failed in run.json and W&B (a stop for a requeue records itself)."""
        try:
            yield
        except (StoppedAtCheckpoint, RequeueRefused):
            raise
        except TrainingDiverged as error:
            self.failed(str(error))
            raise
        except BaseException as error:
            self.failed(f"{type(error).__name__}: {error}")
            raise
