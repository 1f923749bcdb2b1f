"""The tokenizer step's efficiency contract, on CPU: no host synchronisation between log steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed
from hydra import compose, initialize_config_dir

import ibq.cli.common  # noqa: F401  (registers the resolvers the configs use)
from ibq.engine.train_tokenizer import TokenizerTraining

CONF = Path(__file__).resolve().parents[1] / "conf"
# Every way a Python-side read of a tensor waits for the device, and the collective of the old check.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


def tiny_training(tmp_path: Path, *overrides: str) -> TokenizerTraining:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", "eval.rfid=false", "data.val_crops_per_photo=1", "train.steps=4", *overrides])
    return TokenizerTraining(cfg, tmp_path / "run")


def micro_batches(training: TokenizerTraining, count: int = 1) -> list[torch.Tensor]:
    resolution = training.cfg.data.resolution
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(training.layout.micro_batch, 3, resolution, resolution, generator=generator) * 2 - 1 for _ in range(count)]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_step_reads_nothing_on_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accumulation: int):
    training = tiny_training(tmp_path, f"train.micro_batch_size={16 // accumulation}", "train.batch_size=16")
    autocast = torch.autocast("cpu", enabled=False)
    batches = micro_batches(training, accumulation)
    training._step(1, batches, autocast)  # warm-up: lazy state (optimizer steps) is created here

    reads: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _name=name, _original=original, **k: reads.append(_name) or _original(self, *a, **k))
    for name in ("all_reduce", "barrier", "broadcast"):
        monkeypatch.setattr(torch.distributed, name, lambda *a, _name=name, **k: reads.append(_name))
    for step in (2, 3):
        metrics = training._step(step, batches, autocast)
    monkeypatch.undo()

    assert reads == [], f"host reads inside the step: {sorted(set(reads))}"
    assert all(isinstance(value, torch.Tensor) and value.shape == () for value in metrics.values())
    assert {"loss/g", "loss/d", "loss/quantizer", "codebook/batch_utilization"} <= metrics.keys()
    training.divergence.check(3)  # the log step's one read: every loss was finite
