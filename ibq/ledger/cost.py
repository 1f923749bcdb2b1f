"""Device-hour estimates for planned jobs.

Measured first: completed runs of the same stage and model scale (under the searched folders) logged
their throughput (`throughput/images_per_s` in metrics.jsonl, over `distributed.world_size` devices in
run.json): device-hours = steps x global batch x device-seconds per image (the median over those runs).
Otherwise the model scale's reference setup below: steps x seconds per step x the devices it was
measured on. Device-hours do not depend on how many devices a job gets; its wall time does: device-hours
/ the devices of its cluster preset (nodes x max(gpus_per_node, tasks_per_node), or the same keys of
hydra.launcher), else of the reference. Evaluation time is not included."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ibq.ledger.runs import read_json, run_dirs
from ibq.runs.record import MetricsLog


@dataclass(frozen=True)
class StepCost:
    seconds: float  # wall-clock seconds of one optimisation step, every device busy
    devices: int  # devices of the reference setup
    source: str


IMAGENET_TRAIN_IMAGES = 1_281_167
STEP_COSTS = {
    # 1,651,650 steps (330 epochs) took 4-7 days on 64 Ascend 910B (IBQ issue #39): 5.5 days / 1,651,650 steps.
    "paper": StepCost(5.5 * 86400 / 1_651_650, 64, "IBQ issue #39: 330 epochs in 4-7 days on 64 NPUs (midpoint)"),
    # `make demo`: 1700 steps in under 5 minutes on 2 CPU cores (README).
    "tiny": StepCost(5 * 60 / 1700, 1, "ibq demo: 1700 steps in about 5 min on 2 CPU cores"),
    # Stage II (IBQ issue #39): the 300M model on 32 NPUs in about 4 days (300 epochs of 1,669 steps at batch 768),
    # the 2B model on 96 NPUs in about 9 days (450 epochs). No figures for L and XL.
    "B": StepCost(4 * 86400 / (300 * 1669), 32, "IBQ issue #39: AR-B, 300 epochs in about 4 days on 32 NPUs"),
    "XXL": StepCost(9 * 86400 / (450 * 1669), 96, "IBQ issue #39: AR-XXL, 450 epochs in about 9 days on 96 NPUs"),
}


@dataclass(frozen=True)
class Throughput:
    device_seconds_per_image: float  # median over the runs
    runs: int
    example: str  # one of the runs' directories


# run.json's kind -> the config key of the stage's global batch
BATCH_KEYS = {"tokenizer": "train.batch_size", "generator": "ar_train.batch_size"}
KINDS = {"train": "tokenizer", "train_ar": "generator"}  # primary config -> run.json's kind


def measured_throughput(roots: list[Path]) -> dict[tuple[str, str], Throughput]:
    """(run kind, model_scale) -> the device-seconds per image of completed runs below `roots` that logged
    their throughput (each run: the median of its logged values)."""
    found: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for root in roots:
        for run_dir in run_dirs(root) if root.is_dir() else []:
            record = read_json(run_dir / "run.json") or {}
            scale = (record.get("choices") or {}).get("model_scale")
            devices = (record.get("distributed") or {}).get("world_size") or 1
            if record.get("status") != "completed" or record.get("kind") not in BATCH_KEYS or not scale:
                continue
            rates = [line["throughput/images_per_s"] for line in MetricsLog(run_dir / "metrics.jsonl").read()
                     if isinstance(line.get("throughput/images_per_s"), (int, float)) and line["throughput/images_per_s"] > 0]
            if rates:
                found.setdefault((record["kind"], scale), []).append((devices / statistics.median(rates), str(run_dir)))
    return {key: Throughput(statistics.median(v for v, _ in runs), len(runs), runs[0][1]) for key, runs in found.items()}


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


def training_steps(cfg: DictConfig, kind: str) -> int | None:
    """Stage II: ar_train.steps, or ar_train.epochs of ImageNet at ar_train.batch_size. Stage I: train.steps.
    (model_scale gives each stage's config the other's keys too.)"""
    if kind == "tokenizer":
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


def estimate(hydra_cfg: DictConfig, task_cfg: DictConfig, config_name: str, model_scale: str | None,
             measured: dict[tuple[str, str], Throughput] | None = None) -> Estimate:
    """`hydra_cfg`: a composed config with its `hydra` node (the launcher); `task_cfg`: the job's config of the
    primary config `config_name`; `measured`: throughput of completed runs (measured_throughput)."""
    time_limit = time_limit_min(task_cfg) or time_limit_min(hydra_cfg)
    devices = preset_devices(hydra_cfg) or preset_devices(task_cfg)
    kind = KINDS[config_name]
    steps = training_steps(task_cfg, kind)
    batch = OmegaConf.select(task_cfg, BATCH_KEYS[kind], default=None)
    throughput = (measured or {}).get((kind, model_scale or ""))
    if throughput is not None and isinstance(steps, int) and isinstance(batch, int):
        source = (f"measured: {1 / throughput.device_seconds_per_image:.1f} images/s per device, the median of {throughput.runs} "
                  f"completed {kind} run(s) of model_scale={model_scale} (e.g. {throughput.example})")
        return Estimate(steps * batch * throughput.device_seconds_per_image / 3600, devices or 1, time_limit, source)
    cost = STEP_COSTS.get(model_scale or "")
    if cost is None or not isinstance(steps, int):
        return Estimate(None, devices, time_limit, f"no step cost known for model_scale={model_scale}")
    source = cost.source + ("" if devices else f"; wall time for its {cost.devices} device(s), the cluster preset names none")
    return Estimate(steps * cost.seconds * cost.devices / 3600, devices or cost.devices, time_limit, source)
