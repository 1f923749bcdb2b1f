"""Stage II's step on CPU: no host synchronisation between log steps, a non-finite loss still stops the
run before a checkpoint, and the requeue signal is agreed on across ranks only at the steps that say so."""

from __future__ import annotations

from itertools import repeat
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import record_host_reads
import ibq.cli.common  # noqa: F401  (registers the resolvers the configs use)
from ibq.config import CONF_DIR, build
from ibq.engine import distributed
from ibq.engine.checkpoint import CHECKPOINT, save_checkpoint
from ibq.engine.preemption import REQUEUE_CHECK_EVERY, RequeueSignal
from ibq.engine.train_ar import ARTraining
from ibq.errors import TrainingDiverged


def untrained_tokenizer_run(run_dir: Path) -> Path:
    """A tokenizer run directory as stage II reads it: the config, weights and EMA weights of an untrained tokenizer."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none"])
    tokenizer = build(cfg.model, quantizer=build(cfg.quantizer))
    save_checkpoint(run_dir / CHECKPOINT, {
        "step": 0, "signature": "untrained", "config": OmegaConf.to_container(cfg, resolve=True),
        "tokenizer": tokenizer.state_dict(),
        "ema": {f"shadow.{name}": value for name, value in tokenizer.state_dict().items()},
    })
    return run_dir


@pytest.fixture(scope="module")
def ar_config(tmp_path_factory):
    """A tiny stage-II config on an untrained tokenizer: two micro-batches of 4 per step."""
    tokenizer_run = untrained_tokenizer_run(tmp_path_factory.mktemp("tokenizer"))
    codebook_size = torch.load(tokenizer_run / CHECKPOINT, weights_only=True)["config"]["quantizer"]["codebook_size"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train_ar", overrides=[
            f"tokenizer_run={tokenizer_run}", f"transformer.vocab_size={codebook_size}", "transformer.depth=1", "transformer.width=64",
            "transformer.heads=2", "transformer.ffn_hidden=128", "ar_train.steps=4", "ar_train.batch_size=8",
            "ar_train.micro_batch_size=4", "logger=none",
        ])


def token_batches(training: ARTraining):
    """The same micro-batch of random tokens and labels, forever."""
    generator = torch.Generator().manual_seed(0)
    size = (training.layout.micro_batch, training.cfg.transformer.block_size)
    tokens = torch.randint(training.cfg.transformer.vocab_size, size, generator=generator)
    labels = torch.randint(training.num_classes, size[:1], generator=generator)
    return repeat((tokens, labels))


def test_the_ar_step_reads_nothing_on_the_host(ar_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    training = ARTraining(ar_config, tmp_path / "ar")
    autocast = torch.autocast("cpu", enabled=False)
    batches = token_batches(training)
    training._step(1, batches, autocast)  # warm-up: the optimizer's state is created here

    reads = record_host_reads(monkeypatch)
    for step in (2, 3):
        loss, grad_norm, _ = training._step(step, batches, autocast)
    monkeypatch.undo()

    assert reads == [], f"host reads inside the step: {sorted(set(reads))}"
    assert isinstance(loss, torch.Tensor) and loss.shape == () and isinstance(grad_norm, torch.Tensor)
    training.divergence.check(3)  # the log step's one read: every loss was finite


def test_a_non_finite_ar_loss_is_named_at_the_next_check_and_never_checkpointed(ar_config, tmp_path: Path):
    training = ARTraining(ar_config, tmp_path / "ar")
    autocast = torch.autocast("cpu", enabled=False)
    batches = token_batches(training)
    training._step(1, batches, autocast)
    with torch.no_grad():
        training.model.head.weight.fill_(float("nan"))
    for step in (2, 3):
        training._step(step, batches, autocast)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 2 \(loss=nan\).*no checkpoint was written yet"):
        training._save(3)
    assert not training.checkpoint_path.exists()


def test_several_ranks_agree_on_the_requeue_signal_only_at_check_steps(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(distributed, "active", lambda: True)
    reads = record_host_reads(monkeypatch)
    requeue = RequeueSignal(None)
    requeue.received = True  # this rank's signal; the collective (recorded, not run) would tell the others
    device = torch.device("cpu")
    asked = [step for step in range(1, 2 * REQUEUE_CHECK_EVERY + 1) if requeue.pending(device, step, waits_anyway=False)]
    assert asked == [REQUEUE_CHECK_EVERY, 2 * REQUEUE_CHECK_EVERY]
    assert reads.count("all_reduce") == 2
    assert requeue.pending(device, 3, waits_anyway=True) and reads.count("all_reduce") == 3  # a log or checkpoint step
