"""LPIPS with backbone weights from a local file (never downloaded at run time).

The `lpips` package ships its linear heads; the torchvision backbone (VGG16 or AlexNet ImageNet
weights) is read from `backbone_path`, or from torch.hub's checkpoint folder under its usual name."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)
BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


def resolve_backbone(net: str, backbone_path: str | None) -> Path:
    if net not in BACKBONE_FILES:
        raise ValueError(f"lpips net={net!r} is not supported; valid: {', '.join(BACKBONE_FILES)}")
    if backbone_path:
        return Path(backbone_path).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def load_lpips(net: str = "vgg", backbone_path: str | None = None) -> nn.Module:
    """A frozen, eval-mode `lpips.LPIPS`; raises FileNotFoundError (one line) when the backbone or the
    lpips package is missing, so that both are recorded as unavailable unless LPIPS is required."""
    try:
        import lpips
    except ImportError as error:
        raise FileNotFoundError(f"the lpips package cannot be imported ({error}; pip install lpips)") from None

    path = resolve_backbone(net, backbone_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS-{net} backbone weights not found at {path} "
            f"(place torchvision's {BACKBONE_FILES[net]} there or set its path in the config)"
        )
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    # lpips keeps torchvision's layer indices inside its slices: slice2.5.weight <- features.5.weight
    backbone = {}
    for name in model.net.state_dict():
        index_and_param = name.split(".", 1)[1]
        key = f"features.{index_and_param}"
        if key not in state:
            raise ValueError(f"{path} is not a torchvision {net} checkpoint: it lacks {key}")
        backbone[name] = state[key]
    model.net.load_state_dict(backbone)
    model.eval().requires_grad_(False)
    return model


def try_load_lpips(net: str, backbone_path: str | None, required: bool) -> nn.Module | None:
    """The model, or None after saying once why LPIPS is unavailable (raises when required)."""
    try:
        return load_lpips(net, backbone_path)
    except FileNotFoundError as error:
        if required:
            raise
        log.warning("%s; LPIPS is recorded as unavailable", error)
        return None
