"""The process group of a training job: joining it, collectives, and DeepSpeed's engines and checkpoints.

It uses nccl on GPUs and gloo on CPUs. Only rank 0 writes the run's files; every rank takes part in
collectives and checkpoints. Which rank a process is, and the batch layout, are `ibq.engine.ranks`'s."""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ibq.engine.ranks import Ranks, free_port
from ibq.errors import UserError

# Rank 0 evaluates alone while the other ranks wait in a collective: allow a full evaluation.
PROCESS_GROUP_TIMEOUT = timedelta(hours=1)


def device_for(ranks: Ranks, requested: str, key: str) -> torch.device:
    """`auto`: this rank's GPU (by local rank) when there is one, else the CPU. `key` names the setting in errors."""
    if requested == "auto" and torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if requested != "auto" and requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{key}={requested} but no CUDA device is visible; valid here: auto, cpu")
    return torch.device("cpu" if requested == "auto" else requested)


def one_process_device(requested: str) -> torch.device:
    """The `device` key of an app of one process per job (ibq-sample, ibq-eval)."""
    return device_for(Ranks(), requested, "device")


def init_process_group(ranks: Ranks, device: torch.device, always: bool = False) -> None:
    """Joins the job's process group (nccl on GPU, gloo on CPU). A single process only gets one when
    `always` is set (DeepSpeed needs one even then)."""
    if dist.is_initialized() or (ranks.world_size == 1 and not always):
        return
    port = ranks.master_port or (free_port() if ranks.world_size == 1 else None)
    if port is None:
        raise RuntimeError("MASTER_PORT is not set for a multi-process job")
    # Exported as well: DeepSpeed and user code read them from the environment.
    os.environ.update(
        RANK=str(ranks.rank), WORLD_SIZE=str(ranks.world_size), LOCAL_RANK=str(ranks.local_rank),
        MASTER_ADDR=ranks.master_addr, MASTER_PORT=str(port),
    )
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{ranks.master_addr}:{port}",
        rank=ranks.rank,
        world_size=ranks.world_size,
        timeout=PROCESS_GROUP_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )


def data_parallel(module: torch.nn.Module, device: torch.device, broadcast_buffers: bool = True) -> DistributedDataParallel:
    """`module` under DDP, its gradients views of the all-reduce buckets: one copy of the gradients in
    memory instead of two. (Set to None by zero_grad, each is computed anew in the backward pass and
    copied into its bucket, which it then views: measured faster on CPU than zeroing the views in place.)
    With `broadcast_buffers`, rank 0's buffers are copied into every rank's, in place, before each forward."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True, broadcast_buffers=broadcast_buffers)


def shutdown() -> None:
    """Barrier, then destroy the group: a rank that leaves while another still talks to it makes the
    other abort (gloo's 'terminate called without an active exception')."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one."""
    if not active():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_ranks(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Averages scalars (numbers or 0-d device tensors) over ranks, in one all-reduce and one read on
    the host (every rank must pass the same keys)."""
    if not values:
        return {}
    keys = sorted(values)
    tensor = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device) for k in keys])
    if active():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    means = dict(zip(keys, tensor.tolist()))
    return {key: means[key] for key in values}


def average_buffers_(module: torch.nn.Module) -> None:
    """Makes floating-point buffers (running averages kept per rank) equal to their mean over ranks."""
    if not active():
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= dist.get_world_size()


def broadcast_object(obj, src: int = 0):
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# -- DeepSpeed ---------------------------------------------------------------------------------------
def deepspeed_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """DeepSpeed's engine around `model` and its torch optimizer, in the job's process group."""
    if next(model.parameters()).device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    import deepspeed
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def gathered(module: torch.nn.Module, zero_stage: int | None):
    """ZeRO-3 keeps a shard of each parameter per rank: gather them to read the whole module (collective)."""
    if zero_stage != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def full_state_dict(module: torch.nn.Module, zero_stage: int | None) -> dict:
    with gathered(module, zero_stage):
        return {key: value.detach().clone() for key, value in module.state_dict().items()}


def save_engines(engines: dict, directory: Path, tag: str) -> None:
    """Every rank writes its shards of each named engine under directory/<name>/<tag>."""
    for name, engine in engines.items():
        engine.save_checkpoint(str(directory / name), tag=tag, save_latest=False)


def prune_engine_checkpoints(directory: Path, keep: str) -> None:
    """Rank 0, once the checkpoint that names `keep` is committed: the older shards go."""
    for stale in directory.glob("*/step*"):
        if stale.name != keep:
            shutil.rmtree(stale, ignore_errors=True)


def load_engines(engines: dict, directory: Path, saved: dict, world_size: int, checkpoint: Path) -> None:
    """Loads the shards that `saved` (a checkpoint's deepspeed entry) names into each engine."""
    if saved["world_size"] != world_size:
        raise UserError(
            f"{checkpoint} was written by {saved['world_size']} ranks under deepspeed=zero{saved['stage']} and "
            f"this job has {world_size}: ZeRO's shards load only into as many ranks "
            f"(cluster.nodes x cluster.tasks_per_node)"
        )
    for name, engine in engines.items():
        path, _ = engine.load_checkpoint(str(directory / name), tag=saved["tag"], load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no {name} checkpoint {saved['tag']} under {directory}")
