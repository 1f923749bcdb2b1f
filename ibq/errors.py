"""Errors a user can fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input: a config key, a file or a run directory the user pointed at."""


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; training stops and keeps its last good checkpoint."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler stopping the process) outside a submitit job: ends a run like Ctrl-C."""


def interruption(interrupt: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted (Ctrl-C)"


def unset_key(key: str) -> UserError:
    """The error for a ??? key of the config that the command line left unset."""
    return UserError(f"{key} is not set: add {key}=<value> to the command line")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name}={value!r} is invalid: it must be a positive integer")
    return value


def steps_text(steps: list[int]) -> str:
    """Steps for a one-line message: all of a few, the first two and the last of many."""
    return ", ".join(map(str, steps)) if len(steps) <= 6 else f"{steps[0]}, {steps[1]}, …, {steps[-1]} ({len(steps)} in all)"
