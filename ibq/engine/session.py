"""What a training run writes besides its checkpoints: run.json, metrics.jsonl and the W&B mirror.
Only rank 0 writes them; on the other ranks a session records nothing."""

from __future__ import annotations

import errno
import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from ibq.engine.distributed import shutdown
from ibq.engine.preemption import RequeueRefused, StoppedAtCheckpoint
from ibq.engine.ranks import Ranks
from ibq.errors import Terminated, TrainingDiverged, UserError, interruption
from ibq.runs.record import MetricsLog, RunRecord
from ibq.runs.wandb_mirror import NullMirror, open_mirror

log = logging.getLogger(__name__)
# Errors of the storage the run writes to: no space, over quota, read-only, no permission.
STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


@contextmanager
def sigterm_interrupts():
    """SIGTERM raises Terminated while training runs, so that the run ends `interrupted` rather than
    `running` forever; only where nobody else handles it (submitit's jobs and other threads keep theirs)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class RunSession:
    def __init__(self, run_dir: Path, ranks: Ranks, signature: str):
        """Refuses (before anything is written) a run directory whose run.json records another configuration."""
        self.run_dir, self.is_main = run_dir, ranks.is_main
        self.record: RunRecord | None = None
        self.metrics_log: MetricsLog | None = None
        self.mirror = NullMirror()
        if self.is_main:
            RunRecord(run_dir).check_configuration(signature)

    def open(self, cfg: DictConfig, choices: dict, overrides: list[str], kind: str, start_step: int, run_id: str,
             group: str | None, **fields) -> None:
        """Starts (or, resumed at `start_step`, continues) the records; `fields` go into run.json."""
        if not self.is_main:
            return
        (self.run_dir / "media").mkdir(parents=True, exist_ok=True)
        self.record = RunRecord(self.run_dir)
        with self.failures_recorded():
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

    def ended(self, status: str, message: str) -> None:
        """A terminal status other than completed. Recording it must not hide why the run ended: a
        record that cannot be written (the disk that stopped the run is full) is only logged."""
        if not self.is_main or self.record is None:
            return
        try:
            self.record.finish(status, message)
        except OSError as error:
            log.error("could not record status %r in %s: %s", status, self.record.path, error)
        self.mirror.finish(exit_code=1)

    def run(self, train: Callable[[], dict]) -> dict:
        """Runs `train` on every rank; its results complete the records, an exception fails them."""
        with self.failures_recorded(), sigterm_interrupts():
            results = train()
        self.completed(results)
        shutdown()
        return results

    @contextmanager
    def failures_recorded(self):
        """A run that raises ends as failed in run.json and W&B, one stopped by Ctrl-C as interrupted
        (a stop for a requeue records itself). A full disk or a read-only folder is the user's to fix."""
        try:
            yield
        except (StoppedAtCheckpoint, RequeueRefused):
            raise
        except KeyboardInterrupt as interrupt:
            self.ended("interrupted", f"{interruption(interrupt)}: run the same command again to resume from the last checkpoint")
            raise
        except (TrainingDiverged, UserError) as error:
            self.ended("failed", str(error))
            raise
        except OSError as error:
            if error.errno not in STORAGE_ERRORS:
                self.ended("failed", f"{type(error).__name__}: {error}")
                raise
            message = f"cannot write to {error.filename or self.run_dir}: {error.strerror}"
            self.ended("failed", message)
            raise UserError(message) from None
        except BaseException as error:
            self.ended("failed", f"{type(error).__name__}: {error}")
            raise
