"""Ranks, process group and batch layout of a training job.

A job learns its rank from the launcher that started it: torchrun (RANK/WORLD_SIZE), submitit (its
job environment, for Slurm and the local executor) or a plain `srun` step. It uses nccl on GPUs and
gloo on CPUs. Only rank 0 writes the run's files; every rank takes part in collectives and
checkpoints. The global batch is fixed by the config; the micro-batch and the gradient accumulation
follow from the world size."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import subprocess
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ibq.errors import UserError, check_positive_int

# The first free port after this base that a job's id maps to; a requeued job (same id) gets
# another one, since its previous incarnation's port may still be in TIME_WAIT.
PORT_BASE, PORT_SPAN = 20000, 30000
# Rank 0 evaluates alone while the other ranks wait in a collective: allow a full evaluation.
PROCESS_GROUP_TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    launcher: str = "none"  # none | torchrun | submitit | srun

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def job_port(job_id: str, restart: str | None) -> int:
    digest = hashlib.sha256(f"{job_id}/{restart or 0}".encode()).digest()
    return PORT_BASE + int.from_bytes(digest[:4], "big") % PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (e.g. gpu[3-5,9] -> gpu3)."""
    if "[" not in nodelist and "," not in nodelist:
        return nodelist
    result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    if result.returncode != 0 or not result.stdout.split():
        raise RuntimeError(f"cannot expand the Slurm node list {nodelist!r}: {result.stderr.strip()}")
    return result.stdout.split()[0]


def detect_ranks(env: dict | None = None) -> Ranks:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return Ranks(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None,
            launcher="torchrun",
        )
    executor = env.get("SUBMITIT_EXECUTOR")
    if executor == "local":
        return Ranks(
            rank=int(env.get("SUBMITIT_LOCAL_GLOBALID", 0)),
            world_size=int(env.get("SUBMITIT_LOCAL_NTASKS", 1)),
            local_rank=int(env.get("SUBMITIT_LOCAL_LOCALID", 0)),
            master_port=job_port(env.get("SUBMITIT_LOCAL_JOB_ID", "0"), None),
            launcher="submitit",
        )
    # Inside an srun step (submitit's Slurm jobs run in one): SLURM_STEP_NUM_TASKS is the step's
    # size; the batch script alone has no step, so a plain `python` there stays a single process.
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        return Ranks(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_STEP_NUM_TASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"),
            master_port=job_port(env.get("SLURM_JOB_ID", "0"), env.get("SLURM_RESTART_COUNT")),
            launcher="submitit" if executor == "slurm" else "srun",
        )
    return Ranks()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device_for(ranks: Ranks, requested: str) -> torch.device:
    """`auto`: this rank's GPU (by local rank) when there is one, else the CPU."""
    if requested == "auto" and torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if requested != "auto" and requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={requested} but no CUDA device is visible; valid here: auto, cpu")
    return torch.device("cpu" if requested == "auto" else requested)


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


# -- batch layout ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchLayout:
    global_batch: int
    micro_batch: int
    accumulation: int
    world_size: int

    @property
    def per_rank(self) -> int:
        return self.micro_batch * self.accumulation


def job_layout(ranks: Ranks, layout: BatchLayout, zero_stage: int | None) -> dict:
    """How the job's ranks share the work, as run.json records it."""
    return {
        "world_size": ranks.world_size,
        "launcher": ranks.launcher,
        "micro_batch_size": layout.micro_batch,
        "accumulation": layout.accumulation,
        "deepspeed_stage": zero_stage,
    }


def plan_batches(global_batch, micro_batch, world_size: int, section: str = "train") -> BatchLayout:
    """global = micro x accumulation x world size. `micro_batch` None: global / world size. `section`
    names the config node that holds batch_size and micro_batch_size."""
    check_positive_int(f"{section}.batch_size", global_batch)
    if micro_batch is None:
        if global_batch % world_size:
            raise UserError(
                f"{section}.batch_size={global_batch} (the global batch) is not divisible by the world size {world_size}: "
                f"use a multiple of {world_size}, or set {section}.micro_batch_size"
            )
        micro_batch = global_batch // world_size
    check_positive_int(f"{section}.micro_batch_size", micro_batch)
    if global_batch % (micro_batch * world_size):
        raise UserError(
            f"{section}.batch_size={global_batch} (the global batch) is not divisible by {section}.micro_batch_size={micro_batch} "
            f"x world size {world_size} = {micro_batch * world_size}"
        )
    return BatchLayout(global_batch, micro_batch, global_batch // (micro_batch * world_size), world_size)


# -- DeepSpeed ---------------------------------------------------------------------------------------
# zero_optimization keys that one side silently ignores: refused rather than dropped.
ZERO_1_2_ONLY = {
    "allgather_bucket_size", "allgather_partitions", "round_robin_gradients", "parameter_alignment",
    "elastic_checkpoint", "legacy_stage1", "use_multi_rank_bucket_allreduce", "cpu_offload",
}
ZERO_3_ONLY = {
    "offload_param", "zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_hpz_partition_size",
    "memory_efficient_linear", "leaf_module",
}
# Set from train.* so that one config decides the batch and the precision.
DEEPSPEED_DERIVED = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "fp16", "bf16", "zero_optimization",
    "gradient_clipping",
}


def check_deepspeed(ds: dict, precision: str, section: str = "train") -> None:
    """The deepspeed group's options, before anything is built or submitted (`section`: the config node
    with the batch and precision keys)."""
    stage = ds.get("stage")
    if stage is None:
        return
    if stage not in (1, 2, 3):
        raise UserError(f"deepspeed.stage={stage!r} is invalid; valid: 1, 2, 3 (or deepspeed=none)")
    zero = ds.get("zero_optimization") or {}
    name = f"deepspeed=zero{stage}"
    for key in sorted(zero):
        if stage == 3 and key in ZERO_1_2_ONLY:
            raise UserError(
                f"{name} does not support deepspeed.zero_optimization.{key} (a ZeRO-1/2 setting that ZeRO-3 ignores): "
                f"remove it or use deepspeed=zero2"
            )
        if stage < 3 and (key in ZERO_3_ONLY or key.startswith("stage3_")):
            raise UserError(f"{name} does not support deepspeed.zero_optimization.{key} (a ZeRO-3 setting): remove it or use deepspeed=zero3")
    if stage == 3 and zero.get("compute_grad_norm") is False:
        raise UserError(f"{name} does not support deepspeed.zero_optimization.compute_grad_norm=false (ZeRO-1/2 only)")
    taken = sorted(DEEPSPEED_DERIVED & set(ds.get("config") or {}))
    if taken:
        raise UserError(
            f"deepspeed.config.{taken[0]} is set from ibq's own keys ({section}.batch_size, {section}.micro_batch_size, "
            f"{section}.precision, deepspeed.zero_optimization; gradient clipping: ar_optim.grad_clip in stage II, none in stage I): set it there"
        )
    if precision == "fp16":
        raise UserError(
            f"{section}.precision=fp16 with {name} is not supported: DeepSpeed's engines keep fp32 weights here and apply "
            f"{section}.precision through autocast, which has no loss scaling under ZeRO; use bf16, or deepspeed=none"
        )


def deepspeed_config(ds: dict, layout: BatchLayout, gradient_clipping: float = 0.0) -> dict:
    """One engine's config. Weights stay fp32 (the precision applies through torch.autocast, as without
    DeepSpeed); the optimizer is the client's torch optimizer, so the update is the one without DeepSpeed.
    `gradient_clipping` 0: none (DeepSpeed would clip at norm 1.0 unless told otherwise)."""
    return {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.accumulation,
        "zero_optimization": {"stage": ds["stage"], **(ds.get("zero_optimization") or {})},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": gradient_clipping,
        "steps_per_print": 2**31 - 1,
        **(ds.get("config") or {}),
    }


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
