"""The precision a job computes in, from its config (the device is `engine.distributed`'s)."""

from __future__ import annotations

import torch

from ibq.errors import UserError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(name: str, key: str) -> None:
    if name != "auto" and name not in PRECISIONS:
        raise UserError(f"{key}={name!r} is invalid; valid: auto, {', '.join(PRECISIONS)}")


def resolve_precision(name: str, device: torch.device, key: str) -> torch.dtype:
    """'auto' is bf16 on GPU and fp32 on CPU; fp16 needs a GPU. `key` names the setting in errors."""
    check_precision(name, key)
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "fp16" and device.type != "cuda":
        raise UserError(f"{key}=fp16 needs a CUDA device; on CPU use fp32 or bf16")
    return PRECISIONS[name]
