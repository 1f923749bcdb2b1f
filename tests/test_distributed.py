"""Several ranks: the batch layout, each rank's share of the data, and 2-process CPU runs (DDP and
DeepSpeed ZeRO-1/2/3 over gloo) that are interrupted, resume, and match the 1-process run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ONE_CROP_PER_PHOTO, REPO, BackgroundRun, children, cli_env, error_line, read_jsonl, train, train_args
from ibq.data.positions import PositionSampler
from ibq.engine.ranks import BatchLayout, check_deepspeed, deepspeed_config, detect_ranks, plan_batches
from ibq.errors import UserError

# Generator losses are sums of per-image means when the GAN is off and the quantizer is VQ, so two
# ranks of 4 images compute the one-process batch of 8 up to float summation order. (With the GAN on,
# the discriminator's BatchNorm sees 4 images per rank instead of 8, and IBQ's entropy term is taken
# per rank: the losses then differ by about 2% after 6 steps, as in any data-parallel run.)
MATCHING = ["quantizer=vq", "loss.disc_start=1000", "train.steps=10", "train.checkpoint_every=5", "eval.rfid=false"]
COMPARED = ("loss/g", "loss/l1", "loss/quantizer")
TOLERANCE = 1e-3  # relative; measured up to 8e-6 over 10-12 steps for DDP and ZeRO-1/2/3 at one thread per rank
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ibq.cli.train"]


# -- the batch layout and each rank's share --------------------------------------------------------
@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_together_see_the_one_process_stream(world_size: int):
    batch, steps = 8, 3
    shares = [list(PositionSampler(batch, (steps + 1) * batch, rank, world_size, batch)) for rank in range(world_size)]
    share = batch // world_size
    for step in range(steps):
        together = sum((s[step * share : (step + 1) * share] for s in shares), [])
        assert together == list(range((step + 1) * batch, (step + 2) * batch))
    assert len(PositionSampler(0, 16)) == 16 and list(PositionSampler(3, 6)) == [3, 4, 5]


def test_batch_layout_follows_from_the_world_size():
    assert plan_batches(256, None, 64) == BatchLayout(256, 4, 1, 64)
    assert plan_batches(256, 4, 16) == BatchLayout(256, 4, 4, 16)
    assert plan_batches(8, 2, 1).accumulation == 4
    with pytest.raises(UserError, match=r"train.batch_size=8 \(the global batch\) is not divisible by the world size 3"):
        plan_batches(8, None, 3)
    with pytest.raises(UserError, match=r"not divisible by train.micro_batch_size=3 x world size 2 = 6"):
        plan_batches(8, 3, 2)
    with pytest.raises(UserError, match="train.micro_batch_size=0 is invalid"):
        plan_batches(8, 0, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="refuses a CUDA device only where none is visible")
def test_a_cuda_device_where_there_is_none_is_refused_naming_the_apps_key():
    from ibq.engine.distributed import device_for, one_process_device

    with pytest.raises(UserError, match=r"^ar_train.device=cuda:1 but no CUDA device is visible; valid here: auto, cpu$"):
        device_for(detect_ranks({}), "cuda:1", "ar_train.device")
    with pytest.raises(UserError, match=r"^device=cuda but no CUDA device is visible"):  # ibq-tokenize, -sample, -eval
        one_process_device("cuda")
    assert one_process_device("auto") == torch.device("cpu")


def test_ranks_come_from_the_launcher_environment():
    assert detect_ranks({}).world_size == 1
    torchrun = detect_ranks({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"})
    assert (torchrun.rank, torchrun.world_size, torchrun.master_addr, torchrun.master_port, torchrun.launcher) == (1, 2, "h", 29500, "torchrun")
    local = detect_ranks({"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_JOB_ID": "77"})
    assert (local.rank, local.world_size, local.launcher) == (1, 2, "submitit")
    step = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "node7", "SLURM_JOB_ID": "12"}
    srun = detect_ranks(step)
    assert (srun.rank, srun.world_size, srun.master_addr, srun.launcher) == (1, 2, "node7", "srun")
    assert detect_ranks({**step, "SUBMITIT_EXECUTOR": "slurm"}).launcher == "submitit"
    requeued = detect_ranks({**step, "SLURM_RESTART_COUNT": "1"})
    assert requeued.master_port != srun.master_port  # the previous run's port may still be held
    # The batch script of a 2-task job (no srun step): one process, not rank 0 of 2.
    assert detect_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "12"}).world_size == 1


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"stage": 3, "zero_optimization": {"round_robin_gradients": True}}, "deepspeed=zero3 does not support deepspeed.zero_optimization.round_robin_gradients"),
        ({"stage": 3, "zero_optimization": {"allgather_bucket_size": 5}}, "ZeRO-3 ignores"),
        ({"stage": 2, "zero_optimization": {"offload_param": {"device": "cpu"}}}, "deepspeed=zero2 does not support deepspeed.zero_optimization.offload_param"),
        ({"stage": 1, "zero_optimization": {"stage3_prefetch_bucket_size": 5}}, "(a ZeRO-3 setting)"),
        ({"stage": 2, "config": {"train_batch_size": 16}}, "deepspeed.config.train_batch_size is set from ibq's own keys"),
        ({"stage": 4}, "deepspeed.stage=4 is invalid"),
    ],
)
def test_deepspeed_options_a_stage_does_not_support_are_refused(options: dict, expected: str):
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        check_deepspeed(options, "fp32")


def test_deepspeed_config_takes_the_batch_from_the_layout_and_does_not_clip():
    config = deepspeed_config({"stage": 2, "zero_optimization": {"overlap_comm": False}, "config": {"wall_clock_breakdown": True}}, BatchLayout(32, 4, 2, 4))
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (32, 4, 2)
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert config["gradient_clipping"] == 0.0 and config["wall_clock_breakdown"] is True
    check_deepspeed({"stage": None}, "fp16")  # without DeepSpeed, fp16 is the GradScaler's business


@pytest.mark.slow
def test_bad_batch_layout_is_one_line_before_anything_runs(tmp_path: Path):
    line = error_line(train(tmp_path / "run", "train.batch_size=8", "train.micro_batch_size=3"))
    assert "train.batch_size=8 (the global batch) is not divisible by train.micro_batch_size=3 x world size 1" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_gradient_accumulation_matches_the_full_batch(tmp_path: Path):
    """One process, 4 micro-batches of 2 images: the generator losses of the batch of 8."""
    full = BackgroundRun(train_args(tmp_path / "full", *MATCHING, "train.steps=4"))
    accumulated = train(tmp_path / "accumulated", *MATCHING, "train.steps=4", "train.micro_batch_size=2")
    assert full.result().returncode == 0 and accumulated.returncode == 0, accumulated.stderr[-3000:]
    assert json.loads((tmp_path / "accumulated" / "run.json").read_text())["distributed"]["accumulation"] == 4
    assert_losses_match(read_jsonl(tmp_path / "full" / "metrics.jsonl"), read_jsonl(tmp_path / "accumulated" / "metrics.jsonl"))


# -- two processes over gloo -----------------------------------------------------------------------
def assert_losses_match(expected: list[dict], actual: list[dict]) -> None:
    expected = [line for line in expected if "loss/g" in line]
    actual = [line for line in actual if "loss/g" in line]
    assert [line["step"] for line in actual] == [line["step"] for line in expected]
    for a, b in zip(actual, expected):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=TOLERANCE), (a["step"], key, a[key], b[key])


def gradient_buffers(rank: int, port: int, run_dir: Path, answers) -> None:
    """One of two ranks of a tiny tokenizer training (in-process, over gloo): where its networks'
    gradients lie after each of steps 2 and 3 (DDP lays its buckets out anew after the first), as
    (pointer, bytes) of their storages, and the gradient bytes."""
    from hydra import compose, initialize_config_dir

    import ibq.cli.common  # noqa: F401  (registers the resolvers the configs use)
    from ibq.config import CONF_DIR
    from ibq.engine import distributed
    from ibq.engine.train_tokenizer import TokenizerTraining

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", "eval.rfid=false", "data.val_crops_per_photo=1", "train.steps=4",
                                          "train.device=cpu", "loss.perceptual_weight=0"])
    training = TokenizerTraining(cfg, run_dir)
    images = [torch.rand(training.layout.micro_batch, 3, 32, 32, generator=torch.Generator().manual_seed(rank)) * 2 - 1]
    parameters = [*training.tokenizer.parameters(), *training.discriminator.parameters()]
    steps = []
    for step in (1, 2, 3):
        training._step(step, images, torch.autocast("cpu", enabled=False))
        if step > 1:
            steps.append(sorted({(p.grad.untyped_storage().data_ptr(), p.grad.untyped_storage().nbytes()) for p in parameters}))
    answers.put((rank, steps, sum(p.grad.nbytes for p in parameters), len(parameters)))
    distributed.shutdown()


def test_ddp_keeps_one_copy_of_the_gradients_the_same_at_every_step(tmp_path: Path):
    """Under DDP each network's gradients are views of its all-reduce buckets: a few flat buffers holding
    exactly the gradients, allocated once (not a tensor per weight beside the buckets, made anew each step)."""
    import multiprocessing

    from ibq.engine.ranks import free_port

    context = multiprocessing.get_context("spawn")
    answers, port = context.Queue(), free_port()
    ranks = [context.Process(target=gradient_buffers, args=(rank, port, tmp_path / "run", answers)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    reports = sorted(answers.get(timeout=300) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
        assert process.exitcode == 0
    for rank, steps, gradient_bytes, parameters in reports:
        assert steps[0] == steps[1], f"rank {rank}: the gradient buffers changed between steps"
        assert len(steps[0]) <= 6 < parameters, f"rank {rank}: {len(steps[0])} gradient buffers for {parameters} weights"
        assert sum(nbytes for _, nbytes in steps[0]) == gradient_bytes


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("one_process") / "run"
    result = train(run_dir, *MATCHING)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_jsonl(run_dir / "metrics.jsonl")


def torchrun(run_dir: Path, *overrides: str) -> subprocess.Popen:
    photos = [] if any(o.startswith("data=") for o in overrides) else [ONE_CROP_PER_PHOTO]
    args = TORCHRUN + ["train.log_every=1", "logger=none", *photos, *MATCHING, *overrides, f"hydra.run.dir={run_dir}"]
    with (run_dir.parent / f"{run_dir.name}.log").open("a") as log:
        return subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=cli_env())


def interrupt_one_rank(process: subprocess.Popen, run_dir: Path, after_lines: int = 3) -> None:
    """Sends the requeue signal to one of the two ranks once `after_lines` steps are logged."""
    deadline = time.time() + 600
    while process.poll() is None and time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(read_jsonl(run_dir / "metrics.jsonl")) >= after_lines:
            break
        time.sleep(0.2)
    workers = children(process.pid)
    assert len(workers) == 2, (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]
    os.kill(workers[-1], signal.SIGUSR2)
    assert process.wait(timeout=600) != 0


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", ["none", "zero2", "zero3"])  # zero1: in the shard-stream test below
def test_two_ranks_checkpoint_resume_and_match_one_process(tmp_path: Path, one_process: list[dict], deepspeed: str):
    run_dir = tmp_path / "run"
    overrides = [f"deepspeed={deepspeed}", "cluster.requeue_signal=USR2"]
    # First run: the requeue signal reaches one rank only, after step 3.
    interrupt_one_rank(torchrun(run_dir, *overrides), run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted", (run_dir.parent / "run.log").read_text()[-3000:]
    stopped_at = record["requeues"][0]["step"]
    assert 3 <= stopped_at < 10 and record["requeues"][0]["reason"] == "interrupted"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["step"] == stopped_at and len(checkpoint["rng_by_rank"]) == 2
    if deepspeed != "none":
        assert checkpoint["deepspeed"] == {"tag": f"step{stopped_at:07d}", "stage": int(deepspeed[-1]), "world_size": 2}
        for engine in ("generator", "discriminator"):
            assert [p.name for p in (run_dir / "checkpoints" / "deepspeed" / engine).glob("step*")] == [f"step{stopped_at:07d}"]

    # The same command resumes from that checkpoint and finishes.
    assert torchrun(run_dir, *overrides).wait(timeout=600) == 0, (run_dir.parent / "run.log").read_text()[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and [r["step"] for r in record["resumes"]] == [stopped_at]
    assert record["distributed"] == {"world_size": 2, "launcher": "torchrun", "micro_batch_size": 4, "accumulation": 1,
                                     "deepspeed_stage": None if deepspeed == "none" else int(deepspeed[-1])}
    assert_losses_match(one_process, read_jsonl(run_dir / "metrics.jsonl"))
    assert json.loads((run_dir / "results.json").read_text())["step"] == 10

    if deepspeed == "zero2":  # ZeRO's shards load only into as many ranks as wrote them
        line = error_line(train(run_dir, "train.log_every=1", *MATCHING, f"deepspeed={deepspeed}"))
        assert "was written by 2 ranks under deepspeed=zero2 and this job has 1" in line


@pytest.mark.slow
def test_two_ranks_stream_their_own_shards_and_resume_mid_epoch(tmp_path: Path, photo_shards: Path):
    """The photos in 5 shards, 2 ranks x 1 loader worker, under DeepSpeed ZeRO-1: each rank reads its own
    shards; interrupted and resumed, the run's losses and stream position equal an uninterrupted 2-rank run's."""
    overrides = ["data=shards", f"data.sources.main.urls={photo_shards}", "data.num_workers=1", "data.val.limit=4",
                 "cluster.requeue_signal=USR2", "deepspeed=zero1"]
    assert torchrun(tmp_path / "reference", *overrides).wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    run_dir = tmp_path / "run"
    interrupt_one_rank(torchrun(run_dir, *overrides), run_dir)
    stopped_at = json.loads((run_dir / "run.json").read_text())["requeues"][0]["step"]
    interrupted = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["deepspeed"]
    assert interrupted == {"tag": f"step{stopped_at:07d}", "stage": 1, "world_size": 2}
    assert torchrun(run_dir, *overrides).wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert [r["step"] for r in record["resumes"]] == [stopped_at] and record["distributed"]["deepspeed_stage"] == 1
    assert_losses_match(read_jsonl(tmp_path / "reference" / "metrics.jsonl"), read_jsonl(run_dir / "metrics.jsonl"))
    final = [torch.load(d / "checkpoints" / "last.pt", weights_only=True)["data_stream"] for d in (tmp_path / "reference", run_dir)]
    assert final[0] == final[1]
    assert final[0]["slots"] == 2 and sorted(final[0]["cursors"]) == [0, 1] and final[0]["taken"] == 10
