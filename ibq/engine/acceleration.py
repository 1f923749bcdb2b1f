"""How the tokenizer step uses its device: channels_last, torch.compile and activation checkpointing.

`train.channels_last` and `train.compile` default to `auto`: on for CUDA, off on CPU, where neither
pays (tiny tokenizer, batch 8, one thread on a shared 2-core machine: channels_last 23.1 images/s
against 25.7; Inductor took 7 minutes to compile the step, which then ran no faster). Activation
checkpointing trades a second forward pass of the tokenizer's blocks for their activations' memory:
off unless asked. The run record holds the resolved switches (`acceleration` in run.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from ibq.errors import UserError

SWITCHES = {"compile": "auto", "channels_last": "auto", "activation_checkpointing": False}


def _switch(train: DictConfig, key: str, device: torch.device) -> bool:
    value = train.get(key, SWITCHES[key])
    if value == "auto":
        return device.type == "cuda"
    if isinstance(value, bool):
        return value
    raise UserError(f"train.{key}={value!r} is invalid: valid are auto (on for CUDA), true, false")


@dataclass(frozen=True)
class StepAcceleration:
    compile: bool
    channels_last: bool
    activation_checkpointing: bool

    @classmethod
    def from_config(cls, train: DictConfig, device: torch.device) -> StepAcceleration:
        return cls(**{key: _switch(train, key, device) for key in SWITCHES})

    def record(self) -> dict[str, bool]:
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
        if self.compile:
            for module in modules:
                if module is not None:
                    module.compile()


def match_parameter_layout_(optimizer: torch.optim.Optimizer) -> None:
    """After load_state_dict: lays out each state tensor as its parameter, so that a run resumed with
    another train.channels_last (or on another device type) keeps fused Adam's layout rule."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == parameter.shape and value.stride() != parameter.stride():
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)
