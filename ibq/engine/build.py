"""The device and precision a training runs with, from its config."""

from __future__ import annotations

import torch

from ibq.errors import UserError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is visible; valid here: auto, cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on GPU and fp32 on CPU; fp16 needs a GPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in PRECISIONS:
        raise UserError(f"train.precision={name!r} is invalid; valid: auto, {', '.join(PRECISIONS)}")
    if name == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs a CUDA device; on CPU use fp32 or bf16")
    return PRECISIONS[name]
