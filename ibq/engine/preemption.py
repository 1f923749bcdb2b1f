"""Preemption and time limits.

The requeue signal (cluster.requeue_signal; Slurm sends it `signal_delay_s` before the time limit, an
admin or a test sends it to preempt) is only noted when it arrives. At a step boundary every rank
learns of it (the next one in a single process; with several ranks, the next step at which they agree
on it, see REQUEUE_CHECK_EVERY), every rank takes part in a checkpoint, and rank 0 requeues the job through
submitit: the requeued job runs the same call again and so resumes from the checkpoint in the same run
directory, under the same W&B run. A signal near the time limit counts against the job's bound on
timeout requeues (cluster.max_requeues_on_timeout); preemption does not. Outside a submitit job the
run stops after the checkpoint; the same command resumes it."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import NoReturn

import torch

from ibq.engine import distributed
from ibq.engine.checkpoint import CHECKPOINT, keep_checkpoint
from ibq.engine.distributed import any_rank
from ibq.engine.ranks import Ranks
from ibq.runs.record import timestamp

log = logging.getLogger(__name__)

# "Try again later": the run stopped cleanly after a checkpoint and resumes when started again.
INTERRUPTED_EXIT_CODE = 75
# With several ranks the signal is agreed on by a collective, which waits for the device: it is taken at
# log and checkpoint steps (which wait anyway) and every this many steps, the same steps on every rank.
# Ten steps are seconds at paper scale, well inside the signal's lead (cluster.signal_delay_s).
REQUEUE_CHECK_EVERY = 10


class StoppedAtCheckpoint(SystemExit):
    """Leaves the job after its checkpoint without a result: submitit keeps waiting for the requeued
    run (outside submitit, the same command resumes it)."""


class RequeueRefused(RuntimeError):
    """The job hit its time limit more often than it may be requeued for."""


@dataclass(frozen=True)
class RequeueOutcome:
    requeued: bool
    reason: str  # preempted | timeout | interrupted
    exit_code: int | str | None = None
    message: str = ""


def parse_signal(name: str) -> signal.Signals:
    name = name.upper()
    try:
        return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}") from None


class RequeueSignal:
    """Context manager that owns the requeue signal while training runs (None: no handler)."""

    def __init__(self, name: str | None):
        self.signum = parse_signal(name) if name else None
        self.received = False
        self._previous = None

    def __enter__(self) -> "RequeueSignal":
        if self.signum is not None:
            self._previous = signal.signal(self.signum, self._note)
        return self

    def __exit__(self, *exc) -> None:
        if self.signum is not None:
            signal.signal(self.signum, signal.SIG_DFL if self._previous is None else self._previous)

    def _note(self, signum: int, frame) -> None:
        # Nothing else here: a handler runs between two bytecodes, possibly inside a collective.
        self.received = True

    def pending(self, device: torch.device, step: int, waits_anyway: bool) -> bool:
        """Whether any rank received the signal: in a single process, a flag read at every step; with
        several ranks, a collective at steps that wait for the device anyway (`waits_anyway`: a log or
        checkpoint step) and every REQUEUE_CHECK_EVERY steps (every rank calls it at every step)."""
        if not distributed.active():
            return self.received
        if step % REQUEUE_CHECK_EVERY and not waits_anyway:
            return False
        return any_rank(self.received, device)

    def submitit_handler(self):
        """submitit's own handler, which ours replaced; None outside a submitit job."""
        handler = getattr(self._previous, "__self__", None)
        if handler is None:
            return None
        from submitit.core.job_environment import SignalHandler

        return handler if isinstance(handler, SignalHandler) else None

    def requeue(self) -> RequeueOutcome:
        """On rank 0, after the checkpoint: let submitit resubmit the job's call and requeue it."""
        handler = self.submitit_handler()
        if handler is None:
            return RequeueOutcome(False, "interrupted", INTERRUPTED_EXIT_CODE, "not a submitit job: run the same command again to resume")
        from submitit.core.utils import UncompletedJobError

        timed_out = handler.has_timed_out()
        reason = "timeout" if timed_out else "preempted"
        try:
            handler.checkpoint_and_try_requeue(self.signum)
        except SystemExit as exit_:  # submitit requeued the job and asks this process to leave
            return RequeueOutcome(True, reason, exit_.code)
        except UncompletedJobError as error:
            return RequeueOutcome(False, reason, None, str(error))
        return RequeueOutcome(False, reason, None, "submitit neither requeued the job nor refused to")


def checkpoint_or_leave(step: int, steps: int, checkpoint_every: int, save, requeue: RequeueSignal,
                        device: torch.device, ranks: Ranks, session, logged: bool, keep_every: int = 0) -> bool:
    """The end of a training step on every rank: the periodic (and the final) checkpoint, and every
    `keep_every` steps one that stays (keep_checkpoint); on a pending requeue signal, a checkpoint at this
    step unless one was just written, then the exit for requeue. `logged`: this step's figures were read on
    the host. Returns whether `save(step)` wrote a checkpoint."""
    keep = keep_every > 0 and step % keep_every == 0
    saved = step % checkpoint_every == 0 or step == steps or keep
    if saved:
        save(step)  # ends with every rank past the write
        if keep and ranks.is_main:
            keep_checkpoint(session.run_dir / CHECKPOINT, step)
    if step < steps and requeue.pending(device, step, waits_anyway=logged or saved):
        if not saved:
            save(step)
        leave_for_requeue(step, requeue, ranks, session)
    return saved


def leave_for_requeue(step: int, requeue: RequeueSignal, ranks: Ranks, session) -> NoReturn:
    """Every rank, after the checkpoint at `step`: rank 0 requeues through submitit and records it in
    run.json (its RunSession's record); then all leave."""
    record, mirror = session.record, session.mirror
    if ranks.is_main:
        mirror.finish()  # first: a requeue makes Slurm end the job step at once, W&B's service with it
    outcome = distributed.broadcast_object(requeue.requeue() if ranks.is_main else None)
    stops = outcome.requeued or outcome.reason == "interrupted"  # else: a time limit too many times
    refusal = f"not requeued after the checkpoint at step {step} of {session.run_dir}: {outcome.message}"
    if ranks.is_main:
        entry = {
            "step": step,
            "time": timestamp(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "reason": outcome.reason,
            "requeued": outcome.requeued,
        }
        record.update(requeues=[*record.data.get("requeues", []), entry])
        if stops:
            record.update(status="requeued" if outcome.requeued else "interrupted")
            log.warning("signal %s: checkpoint at step %d; %s", requeue.signum.name, step,
                        "job requeued" if outcome.requeued else outcome.message)
        else:
            record.finish("failed", refusal)
    distributed.shutdown()
    if stops:
        raise StoppedAtCheckpoint(outcome.exit_code)
    raise RequeueRefused(refusal)
