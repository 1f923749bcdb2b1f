"""How the tokenizer step uses its device: channels_last, torch.compile and activation checkpointing.

`train.compile` defaults to `auto`: torch.compile's default mode on CUDA, none on CPU, where it does not
pay (Inductor took 7 minutes to compile the tiny step on a shared 2-core machine, which then ran no
faster), and none on a GPU Triton does not compile for, where a mode asked for is refused. Its other
values are torch.compile's modes: `reduce-overhead` replays each compiled network's forward and backward
as CUDA graphs, for steps whose time goes to launching kernels (small micro-batches).
`train.channels_last` defaults to `auto`: on where the step is compiled. Eager, PyTorch's GroupNorm
reads NHWC inputs slowly: on an H200 the paper's eager step ran at 49.0 images/s at micro-batch 32 with
channels_last, where an earlier version's NCHW step ran at 59.1; on CPU the tiny step at 23.1 against
25.7. `train.activation_checkpointing` trades compute for activation memory, off unless asked: `norms`
recomputes each GroupNorm + SiLU pair in the backward pass (one memory-bound pass more, where their fp32
outputs are most of what a block keeps), `blocks` (or true) every block (a second forward pass). The run
record holds the resolved switches (`acceleration` in run.json)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from ibq.errors import UserError
from ibq.inductor import gpu_kernels_unavailable
from ibq.models.tokenizer import RECOMPUTE

log = logging.getLogger(__name__)

SWITCHES = {"compile": "auto", "channels_last": "auto", "activation_checkpointing": "none"}
# "none", then torch.compile's modes (torch.compile documents these four).
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _switch(train: DictConfig, key: str, auto: bool) -> bool:
    value = train.get(key, SWITCHES[key])
    if value == "auto":
        return auto
    if isinstance(value, bool):
        return value
    raise UserError(f"train.{key}={value!r} is invalid: valid are auto (on where compiled), true, false")


def _named(train: DictConfig, key: str, names: tuple[str, ...], false: str, true: str, also: tuple[str, ...] = ()) -> str:
    """A key that takes one of `names`, false and true standing for two of them; `also`: further valid
    values, handled by the caller, for the error message."""
    value = train.get(key, SWITCHES[key])
    if isinstance(value, bool):
        return true if value else false
    if value not in names:
        raise UserError(f"train.{key}={value!r} is invalid: valid are {', '.join(also + names)} (false: {false}, true: {true})")
    return value


@dataclass(frozen=True)
class StepAcceleration:
    compile: str  # one of COMPILE_MODES
    channels_last: bool
    activation_checkpointing: str  # one of RECOMPUTE

    @classmethod
    def from_config(cls, train: DictConfig, device: torch.device) -> StepAcceleration:
        unavailable = gpu_kernels_unavailable(device) if device.type == "cuda" else None
        if train.get("compile", SWITCHES["compile"]) == "auto":
            mode = "default" if device.type == "cuda" and unavailable is None else "none"
            if unavailable:
                log.warning("train.compile=auto runs the networks eagerly: torch.compile cannot generate kernels here (%s)", unavailable)
        else:
            mode = _named(train, "compile", COMPILE_MODES, false="none", true="default", also=("auto (default on CUDA, none elsewhere)",))
            if mode != "none" and unavailable:
                raise UserError(f"train.compile={mode} cannot run on {device}: {unavailable}; give train.compile=false")
        return cls(compile=mode, channels_last=_switch(train, "channels_last", mode != "none"),
                   activation_checkpointing=_named(train, "activation_checkpointing", RECOMPUTE, false="none", true="blocks"))

    @property
    def compiled(self) -> bool:
        return self.compile != "none"

    def record(self) -> dict[str, bool | str]:
        return asdict(self)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def lay_out(self, *modules: nn.Module | None) -> None:
        """Parameters in the step's memory format. Before the optimizers and the EMA copy are built:
        fused Adam refuses a state laid out otherwise than its parameter."""
        for module in modules:
            if module is not None:
                module.to(memory_format=self.memory_format)

    def compile_modules(self, *modules: nn.Module | None) -> None:
        """Compiles each module's forward in place (its state_dict keys stay as they are)."""
        if self.compiled:
            log.info("train.compile=%s: the networks are compiled during the first step, which takes minutes on a "
                     "GPU (train.compile=false runs them eagerly)", self.compile)
            for module in modules:
                if module is not None:
                    module.compile(mode=self.compile)


def match_parameter_layout_(optimizer: torch.optim.Optimizer) -> None:
    """After load_state_dict: lays out each state tensor as its parameter, so that a run resumed with
    another train.channels_last (or on another device type) keeps fused Adam's layout rule."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == parameter.shape and value.stride() != parameter.stride():
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)
