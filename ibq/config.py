"""Configuration helpers shared by every layer: where the config folders are, instantiating a config
node, the checks of command-line overrides, and Hydra's multi-line errors condensed to one line.

A leaf module: it imports nothing of ibq but the errors, so cli, ledger and data all use it."""

from __future__ import annotations

from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from ibq.errors import UserError


def find_conf_dir() -> Path:
    """The primary config folder: inside the installed package (a wheel carries conf/, experiments/ and
    sweeps/ as ibq/conf), else the checkout's top-level conf/."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "conf"


CONF_DIR = find_conf_dir()
SWEEPS_DIR = CONF_DIR / "sweep"


def build(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, re-raising a UserError from inside the constructed object as itself."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def one_line(message: str) -> str:
    """Hydra's multi-line composition errors, condensed to the lines that name the problem."""
    noise = ("full_key:", "object_type", "Set the environment variable", "reference_type")
    lines = [line.strip() for line in message.splitlines() if line.strip() and not line.strip().startswith(noise)]
    return "; ".join(lines)


# Hydra flags that take the next argument as their value.
VALUE_FLAGS = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--cfg", "-c", "--package", "-p", "--info", "-i"}


def override_args(argv: list[str]) -> list[str]:
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-") and "=" in arg:
            args.append(arg)
    return args


def available(group_dir: Path) -> list[str]:
    names = [p.stem for p in group_dir.glob("*.yaml")]
    return sorted(names, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))


def parse(arg: str):
    try:
        return OverridesParser.create().parse_override(arg)
    except HydraException as error:
        raise UserError(f"cannot parse the override {arg!r}: {one_line(str(error))}") from None


def group_choices(argv: list[str], conf_dir: Path):
    """(argument, group, [choices]) for each override that selects from a config group."""
    for arg in override_args(argv):
        override = parse(arg)
        group_dir = conf_dir / override.key_or_group
        if override.is_delete() or override.package is not None or not group_dir.is_dir():
            continue
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        yield arg, override.key_or_group, [str(value) for value in values]


def quote_numeric_choices(argv: list[str], conf_dir: Path) -> list[str]:
    """Hydra rejects a group choice that parses as a number (codebook_size=1024); quote it."""
    rewritten = {}
    for arg, group, choices in group_choices(argv, conf_dir):
        if any(choice.lstrip("-").isdigit() for choice in choices):
            prefix = arg.split("=", 1)[0]
            rewritten[arg] = f"{prefix}=" + ",".join(f'"{choice}"' for choice in choices)
    return [rewritten.get(arg, arg) for arg in argv]


def first_of_each_sweep(args: list[str]) -> list[str]:
    """One job's overrides out of a sweep: each `key=a,b` becomes `key=a`."""
    single = []
    for arg in args:
        override = parse(arg)
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            arg = f"{arg.split('=', 1)[0]}={first}"
        single.append(arg)
    return single


def check_group_choices(argv: list[str], conf_dir: Path) -> None:
    """Every `group=choice` names an existing config file; numeric groups get a hint."""
    for _, group, choices in group_choices(argv, conf_dir):
        group_dir = conf_dir / group
        valid = available(group_dir)
        for choice in choices:
            if choice in valid:
                continue
            if group == "codebook_size":
                if choice.isdigit() and int(choice) > 0:
                    raise UserError(
                        f"codebook_size={choice} has no preset (presets: {', '.join(valid)}); "
                        f"any positive size works as the plain key quantizer.codebook_size={choice}"
                    )
                raise UserError(
                    f"codebook_size={choice} is invalid: it must be a positive integer "
                    f"(presets: {', '.join(valid)}; other sizes through quantizer.codebook_size=N)"
                )
            raise UserError(f"{group}={choice} is not a config in {group_dir}; valid: {', '.join(valid)}")
