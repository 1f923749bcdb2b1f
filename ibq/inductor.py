"""Whether torch.compile's Inductor can generate kernels for a GPU. Its CUDA kernels are Triton's, which
needs the triton package (Linux CUDA builds of torch ship it) and a GPU of compute capability 7.0 or
more; torch finds out only when it first generates code, inside the first compiled call."""

from __future__ import annotations

import importlib.util

import torch

TRITON_MIN_CAPABILITY = (7, 0)


def gpu_kernels_unavailable(device: torch.device) -> str | None:
    """Why Inductor cannot generate kernels for the CUDA `device`, or None where it can."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    capability = torch.cuda.get_device_capability(device)
    if capability < TRITON_MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}, and Triton "
                f"needs {TRITON_MIN_CAPABILITY[0]}.{TRITON_MIN_CAPABILITY[1]} or more")
    return None
