"""Device-hour estimates for planned jobs: training steps x seconds per step x devices.

Devices come from the cluster preset when it names them (cluster.nodes x gpus_per_node or
tasks_per_node, or the same keys of hydra.launcher); otherwise from the model scale's reference setup below.
Evaluation time is not included."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class StepCost:
    seconds: float  # wall-clock seconds of one optimisation step, every device busy
    devices: int  # devices of the reference setup
    source: str


IMAGENET_TRAIN_IMAGES = 1_281_167
STEP_COSTS = {
    # 1,651,650 steps (330 epochs) took 4-7 days on 64 Ascend 910B (IBQ issue #39): 5.5 days / 1,651,650 steps.
    "paper": StepCost(5.5 * 86400 / 1_651_650, 64, "IBQ issue #39: 330 epochs in 4-7 days on 64 NPUs (midpoint)"),
    # `make demo`: 3000 steps in about 4 minutes on 2 CPU cores.
    "tiny": StepCost(0.08, 1, "ibq demo: 3000 steps in about 4 min on 2 CPU cores"),
    # Stage II (IBQ issue #39): the 300M model on 32 NPUs in about 4 days (300 epochs of 1,669 steps at batch 768),
    # the 2B model on 96 NPUs in about 9 days (450 epochs). No figures for L and XL.
    "B": StepCost(4 * 86400 / (300 * 1669), 32, "IBQ issue #39: AR-B, 300 epochs in about 4 days on 32 NPUs"),
    "XXL": StepCost(9 * 86400 / (450 * 1669), 96, "IBQ issue #39: AR-XXL, 450 epochs in about 9 days on 96 NPUs"),
}


@dataclass(frozen=True)
class Estimate:
    device_hours: float | None
    devices: int | None
    time_limit_min: float | None
    source: str


def cluster_node(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key, default=None)
    return value if isinstance(value, DictConfig) else None


def preset_devices(cfg: DictConfig) -> int | None:
    """Devices the cluster preset allocates per job: nodes x max(gpus_per_node, tasks_per_node)."""
    for node in (cluster_node(cfg, "cluster"), cluster_node(cfg, "hydra.launcher")):
        if node is None:
            continue
        per_node = max(node.get("gpus_per_node") or 0, node.get("tasks_per_node") or 0)
        if per_node > 0:
            return int(node.get("nodes") or 1) * per_node
    return None


def time_limit_min(cfg: DictConfig) -> float | None:
    for key in ("cluster.time_min", "hydra.launcher.timeout_min"):
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, (int, float)):
            return value
    return None


def training_steps(cfg: DictConfig) -> int | None:
    """Stage II (an ar_train node): ar_train.steps, or ar_train.epochs of ImageNet at ar_train.batch_size.
    Stage I: train.steps. (The AR scales also carry the tokenizer's train.steps.)"""
    if OmegaConf.select(cfg, "ar_train", default=None) is None:
        steps = OmegaConf.select(cfg, "train.steps", default=None)
        return steps if isinstance(steps, int) else None
    steps = OmegaConf.select(cfg, "ar_train.steps", default=None)
    epochs = OmegaConf.select(cfg, "ar_train.epochs", default=None)
    batch = OmegaConf.select(cfg, "ar_train.batch_size", default=None)
    if isinstance(steps, int):
        return steps
    if isinstance(epochs, int) and isinstance(batch, int) and batch > 0:
        return epochs * -(-IMAGENET_TRAIN_IMAGES // batch)
    return None


def estimate(hydra_cfg: DictConfig, task_cfg: DictConfig, model_scale: str | None) -> Estimate:
    """`hydra_cfg`: a composed config with its `hydra` node (the launcher); `task_cfg`: the job's config."""
    time_limit = time_limit_min(task_cfg) or time_limit_min(hydra_cfg)
    cost = STEP_COSTS.get(model_scale or "")
    devices = preset_devices(hydra_cfg) or preset_devices(task_cfg)
    steps = training_steps(task_cfg)
    if cost is None or not isinstance(steps, int):
        return Estimate(None, devices, time_limit, f"no step cost known for model_scale={model_scale}")
    used = devices or cost.devices
    source = cost.source + ("" if devices else f"; {used} device(s) assumed, the cluster preset names none")
    return Estimate(steps * cost.seconds * used / 3600, used, time_limit, source)
