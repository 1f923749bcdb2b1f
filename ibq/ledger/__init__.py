"""The sweep ledger: a sweep's jobs before launch (plan), their runs and states after (sweep), relaunching
(launch), and runs read back from W&B (wandb_source).

`completed_run(signature, roots)` is the hook for the training entry point: a job whose signature has a
completed run below `roots` need not run again."""

from ibq.ledger.runs import completed_run

__all__ = ["completed_run"]
