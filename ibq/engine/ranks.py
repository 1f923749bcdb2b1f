"""Which rank a process is, and how a job lays its batch out over ranks and DeepSpeed's ZeRO stages.

A job learns its rank from the launcher that started it: torchrun (RANK/WORLD_SIZE), submitit (its
job environment, for Slurm and the local executor) or a plain `srun` step. The global batch is fixed by
the config; the micro-batch and the gradient accumulation follow from the world size. Plain Python
without torch: the apps' config checks, and Hydra's shell completion, start without loading it."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from dataclasses import dataclass

from ibq.errors import UserError, check_positive_int

# The first free port after this base that a job's id maps to; a requeued job (same id) gets
# another one, since its previous incarnation's port may still be in TIME_WAIT.
PORT_BASE, PORT_SPAN = 20000, 30000


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
