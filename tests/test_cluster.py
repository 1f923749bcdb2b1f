"""Sweeps, preemption and failures on a real Slurm (the local single-node cluster of `make slurm-up`),
and the cluster settings refused before anything is submitted. Tests that need Slurm are skipped
without it, unless IBQ_REQUIRE_SLURM=1 (as in CI), where they fail instead."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import (IBQ_TRAIN, IBQ_TRAIN_AR, ONE_CROP_PER_PHOTO, REPO, SMALL_AR, BackgroundRun, cli_env, read_jsonl,
                      require_slow_mark, run_cli)

pytestmark = pytest.mark.slow
SHORT = ["train.log_every=1", "logger=none", ONE_CROP_PER_PHOTO, "eval.rfid=false"]
LOSS_KEYS = ("loss/g", "loss/l1", "loss/quantizer", "loss/d", "loss/lecam", "codebook/batch_perplexity")


@pytest.fixture(scope="module")
def slurm() -> None:
    if shutil.which("sbatch") is None:
        problem = "Slurm is not installed here (make slurm-up)"
    else:
        status = subprocess.run(["bash", "scripts/slurm.sh", "status"], cwd=REPO, capture_output=True, text=True, timeout=120)
        problem = None if status.returncode == 0 else f"the local Slurm is not healthy (make slurm-up): {status.stdout[-500:]}"
    if problem and os.environ.get("IBQ_REQUIRE_SLURM") == "1":
        pytest.fail(problem)
    if problem:
        pytest.skip(problem)


def submit(args: list[str], timeout: float = 900, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(IBQ_TRAIN + args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=cli_env(**extra))


def in_background(command: list[str], log: Path) -> subprocess.Popen:
    require_slow_mark(command)
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=cli_env())


def submit_in_background(args: list[str], log: Path) -> subprocess.Popen:
    return in_background(IBQ_TRAIN + args, log)


def wait_for_step(sweep: Path, step: int, process: subprocess.Popen, timeout: float = 600) -> Path:
    """The job's run directory once it has logged `step` (<sweep>/<overrides>, or for stage II
    <sweep>/<tokenizer run>/<overrides>)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        for metrics in sweep.rglob("metrics.jsonl"):
            if any(line.get("step", 0) >= step for line in read_jsonl(metrics)):
                return metrics.parent
        time.sleep(0.2)
    raise AssertionError(f"no job of {sweep} reached step {step}")


def job_states(job_id: str, final: int, timeout: float = 60) -> list[str]:
    """The states of a job's runs (a requeue starts a new one) once `final` of them have ended:
    accounting lags the job by a second or two."""
    deadline = time.time() + timeout
    while True:
        out = subprocess.run(["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "JobID,State"], capture_output=True, text=True, timeout=60)
        states = [line.split("|")[1] for line in out.stdout.splitlines() if line]
        if sum(state not in ("PENDING", "RUNNING", "COMPLETING") for state in states) >= final or time.time() > deadline:
            return states
        time.sleep(1)


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


# -- sweeps ----------------------------------------------------------------------------------------
def test_sweep_is_one_slurm_array_and_every_job_completes_with_its_record(slurm, tmp_path: Path):
    sweep = tmp_path / "sweep"
    result = submit(["-m", "cluster=slurm", "quantizer=ibq,vq", "codebook_size=256,1024", "train.steps=2", *SHORT, f"hydra.sweep.dir={sweep}"])
    assert result.returncode == 0, result.stderr[-3000:]
    # while it waited, a bar said where the jobs stood; its last state is every job done
    bar = last_line(result.stderr.replace("\r", "\n")).rstrip()
    assert bar.startswith("slurm jobs: 100%|") and bar.endswith(", 4 done"), bar

    job_folders = [p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)]
    arrays = {name.split("_")[0] for name in job_folders}
    assert len(arrays) == 1 and len(job_folders) == 4, job_folders
    assert job_states(arrays.pop(), final=4) == ["COMPLETED"] * 4

    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/run.json"))]
    assert len(records) == 4 and len({r["signature"] for r in records}) == 4
    assert {(r["choices"]["quantizer"], r["choices"]["codebook_size"]) for r in records} == {
        ("ibq", "256"), ("ibq", "1024"), ("vq", "256"), ("vq", "1024")}
    for record in records:
        assert record["status"] == "completed" and record["slurm_job_id"] and record["total_steps"] == 2
        assert record["distributed"]["launcher"] == "submitit" and record["distributed"]["world_size"] == 1
    for run_dir in sweep.glob("*/run.json"):
        assert json.loads((run_dir.parent / "results.json").read_text())["step"] == 2
        assert [line["step"] for line in read_jsonl(run_dir.parent / "metrics.jsonl")] == [1, 2, 2]


# -- preemption and time limits --------------------------------------------------------------------
def test_preempted_job_is_requeued_and_resumes_like_an_uninterrupted_run(slurm, tmp_path: Path):
    steps = ["train.steps=20", "train.checkpoint_every=10"]
    # The uninterrupted reference trains beside the Slurm job: one core each.
    reference = BackgroundRun(IBQ_TRAIN + [*steps, *SHORT, f"hydra.run.dir={tmp_path / 'reference'}"])

    sweep = tmp_path / "sweep"
    # With W&B: the signal reaches every process of the job step, wandb's service among them.
    process = submit_in_background(["cluster=slurm", *steps, *SHORT, "logger=wandb", f"hydra.sweep.dir={sweep}"], tmp_path / "submit.log")
    run_dir = wait_for_step(sweep, 5, process)
    job_id = json.loads((run_dir / "run.json").read_text())["slurm_job_id"]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)  # what submitit's _interrupt sends
    assert process.wait(timeout=900) == 0, (tmp_path / "submit.log").read_text()[-3000:]
    reference = reference.result()
    assert reference.returncode == 0, reference.stderr[-3000:]

    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    [requeue] = record["requeues"]
    assert (requeue["reason"], requeue["requeued"], requeue["slurm_job_id"]) == ("preempted", True, job_id)
    assert 5 <= requeue["step"] < 20
    assert [(r["step"], r["slurm_job_id"]) for r in record["resumes"]] == [(requeue["step"], job_id)]
    assert job_states(job_id, final=2) == ["REQUEUED", "COMPLETED"]
    # One W&B run, resumed: each process start leaves an offline folder under the run's id.
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and {path.name.rsplit("-", 1)[1] for path in wandb_runs} == {record["signature"]}
    assert record["wandb"]["id"] == record["signature"]

    expected = read_jsonl(tmp_path / "reference" / "metrics.jsonl")
    actual = read_jsonl(run_dir / "metrics.jsonl")
    assert [line["step"] for line in actual] == [line["step"] for line in expected]  # nothing lost, nothing twice
    for a, b in zip(actual, expected):
        for key in LOSS_KEYS:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert not list(run_dir.rglob(".*.tmp*"))


def test_two_ranks_of_a_preempted_job_requeue_together_and_resume_like_one_process(slurm, tmp_path: Path):
    # VQ without the GAN: two ranks of 4 images compute one process's batch of 8 up to summation order, whose
    # differences grow with the steps (2.6e-5 relative after 10, 2e-3 after 16): 10 steps, as test_distributed.
    settings = ["quantizer=vq", "loss.disc_start=1000", "train.steps=10", "train.checkpoint_every=5", *SHORT]
    reference = BackgroundRun(IBQ_TRAIN + [*settings, f"hydra.run.dir={tmp_path / 'reference'}"])
    sweep = tmp_path / "sweep"
    process = submit_in_background(["cluster=slurm", "cluster.tasks_per_node=2", *settings, f"hydra.sweep.dir={sweep}"], tmp_path / "submit.log")
    run_dir = wait_for_step(sweep, 3, process)
    job_id = json.loads((run_dir / "run.json").read_text())["slurm_job_id"]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)  # to both tasks, as Slurm's own signal
    assert process.wait(timeout=900) == 0, (tmp_path / "submit.log").read_text()[-3000:]
    assert reference.result().returncode == 0

    record = json.loads((run_dir / "run.json").read_text())
    [requeue] = record["requeues"]
    assert record["status"] == "completed" and (requeue["reason"], requeue["requeued"]) == ("preempted", True)
    assert [r["step"] for r in record["resumes"]] == [requeue["step"]] and 3 <= requeue["step"] < 10
    assert record["distributed"]["world_size"] == 2 and record["distributed"]["launcher"] == "submitit"
    assert job_states(job_id, final=2) == ["REQUEUED", "COMPLETED"]
    expected, actual = (read_jsonl(folder / "metrics.jsonl") for folder in (tmp_path / "reference", run_dir))
    assert [line["step"] for line in actual] == [line["step"] for line in expected]  # nothing lost, nothing twice
    for a, b in zip(actual, expected):
        for key in ("loss/g", "loss/l1", "loss/quantizer"):
            if key in b:  # not in the final evaluation's line
                assert a[key] == pytest.approx(b[key], rel=1e-3), (a["step"], key)  # test_distributed's tolerance


def test_preempted_stage_two_job_is_requeued_and_resumes_like_an_uninterrupted_run(slurm, small_tokenizer_run: Path, tmp_path: Path):
    steps = [f"tokenizer_run={small_tokenizer_run}", *SMALL_AR, "ar_train.steps=20", "ar_train.checkpoint_every=10",
             "ar_train.log_every=1", "ar_train.grid_classes=2"]
    reference = BackgroundRun(IBQ_TRAIN_AR + steps + [f"hydra.run.dir={tmp_path / 'reference'}"])

    sweep, log = tmp_path / "sweep", tmp_path / "submit.log"
    process = in_background(IBQ_TRAIN_AR + ["cluster=slurm", *steps, "logger=wandb", f"hydra.sweep.dir={sweep}"], log)
    run_dir = wait_for_step(sweep, 5, process)
    job_id = json.loads((run_dir / "run.json").read_text())["slurm_job_id"]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)
    assert process.wait(timeout=900) == 0, log.read_text()[-3000:]
    reference = reference.result()
    assert reference.returncode == 0, reference.stderr[-3000:]

    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["kind"] == "generator"
    [requeue] = record["requeues"]
    assert (requeue["reason"], requeue["requeued"], requeue["slurm_job_id"]) == ("preempted", True, job_id)
    assert [(r["step"], r["slurm_job_id"]) for r in record["resumes"]] == [(requeue["step"], job_id)]
    assert job_states(job_id, final=2) == ["REQUEUED", "COMPLETED"]
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and {path.name.rsplit("-", 1)[1] for path in wandb_runs} == {record["signature"]}

    expected = read_jsonl(tmp_path / "reference" / "metrics.jsonl")
    actual = read_jsonl(run_dir / "metrics.jsonl")
    assert [line["step"] for line in actual] == [line["step"] for line in expected] == list(range(1, 21))
    for a, b in zip(actual, expected):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), a["step"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["step"] == 20 and (run_dir / results["sample_grid"]).is_file()


def test_time_limit_requeues_are_bounded(slurm, tmp_path: Path):
    # With a 5-minute limit every signal counts as the time limit (submitit: past 80% of it or within
    # 10 minutes of it); with no timeout requeue allowed, the job checkpoints and fails.
    sweep = tmp_path / "sweep"
    args = ["cluster=slurm", "cluster.time_min=5", "cluster.max_requeues_on_timeout=0", "train.steps=300", *SHORT, f"hydra.sweep.dir={sweep}"]
    process = submit_in_background(args, tmp_path / "submit.log")
    run_dir = wait_for_step(sweep, 3, process)
    job_id = json.loads((run_dir / "run.json").read_text())["slurm_job_id"]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)
    assert process.wait(timeout=300) == 1
    line = last_line((tmp_path / "submit.log").read_text())  # the sweep's summary names the job and why it failed
    assert line.startswith("  job 1/1 (") and "failed: RequeueRefused: not requeued after the checkpoint at step" in line, line
    assert "timed-out too many times" in line
    record = json.loads((run_dir / "run.json").read_text())
    [requeue] = record["requeues"]
    assert (record["status"], requeue["reason"], requeue["requeued"]) == ("failed", "timeout", False)
    assert f"checkpoint at step {requeue['step']}" in record["error"]
    assert (run_dir / "checkpoints" / "last.pt").is_file()


# -- failures --------------------------------------------------------------------------------------
def test_crashed_job_is_reported_failed_with_its_log(slurm, tmp_path: Path):
    sweep = tmp_path / "sweep"
    process = submit_in_background(["cluster=slurm", "train.steps=500", *SHORT, f"hydra.sweep.dir={sweep}"], tmp_path / "submit.log")
    run_dir = wait_for_step(sweep, 2, process)
    job_id = json.loads((run_dir / "run.json").read_text())["slurm_job_id"]
    pids = subprocess.run(["scontrol", "listpids", job_id], capture_output=True, text=True, timeout=60).stdout.split("\n")[1:]
    task = next(int(fields[0]) for fields in map(str.split, pids) if len(fields) == 5 and fields[2] == "0")
    os.kill(task, signal.SIGKILL)  # the training process dies without a word
    assert process.wait(timeout=600) == 1  # reported, not waited on until the job's 500 steps or time limit
    line = last_line((tmp_path / "submit.log").read_text())
    assert line.startswith(f"error: job {job_id} (task 0) ended FAILED without a result; its log: "), line
    assert Path(line.split("its log: ")[1].split(" ")[0]).is_file()


# -- the apps of one process per job ---------------------------------------------------------------
def app(name: str) -> list[str]:
    return [sys.executable, "-m", f"ibq.cli.{name}"]


@pytest.fixture(scope="module")
def imported_ar(tmp_path_factory) -> Path:
    """The official tiny AR fixture imported: <path>/tokenizer and <path>/ar."""
    from ibq.cli.import_official import main as ibq_import

    official, imported = REPO / "tests" / "fixtures" / "official", tmp_path_factory.mktemp("imported") / "ar_tiny"
    ibq_import([str(official / "ar_tiny.ckpt"), "--config", str(official / "ar_tiny_config.json"), "-o", str(imported), "logger=none"])
    return imported


def test_tokenize_sample_and_eval_jobs_run_on_slurm_and_say_where_their_results_are(slurm, imported_ar: Path, tmp_path: Path):
    run_copy = shutil.copytree(imported_ar, tmp_path / "imported")  # the evaluation writes into its tokenizer run
    tokenizer, generator = run_copy / "tokenizer", run_copy / "ar"
    on_slurm = ["cluster=slurm", "cluster.time_min=10"]  # where a job runs does not name its folder
    runs = {  # submitted together: the node runs them side by side
        "tokenize": BackgroundRun(app("tokenize") + ["-m", *on_slurm, f"tokenizer_run={tokenizer}", "samples=16,32",
                                                     f"hydra.sweep.dir={tmp_path / 'tokenize'}"]),
        "sample": BackgroundRun(app("sample") + [*on_slurm, f"run_dir={generator}", "samples_per_class=2", "metrics.fid=false",
                                                 f"hydra.sweep.dir={tmp_path / 'sample'}"]),
        "eval": BackgroundRun(app("eval") + [*on_slurm, f"run_dir={tokenizer}", "metrics.fid=false", "metrics.lpips=[]",
                                             f"hydra.sweep.dir={tmp_path / 'eval'}"]),
    }
    results = {name: run.result(timeout=600) for name, run in runs.items()}
    for name, result in results.items():
        assert result.returncode == 0, f"{name}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
        logs = list((tmp_path / name).glob(".submitit/*/*_0_log.out"))  # one per Slurm job (task 0: each job has one)
        assert len(logs) == (2 if name == "tokenize" else 1), logs

    for samples in (16, 32):  # one array of two jobs, each a token folder of its own, named by its tokenizer run as a single run's
        folder = tmp_path / "tokenize" / tokenizer.name / f"samples={samples}"
        assert json.loads((folder / "manifest.json").read_text())["samples"] == samples
        assert f"samples={samples}): done: {folder}" in results["tokenize"].stdout
    folder = tmp_path / "sample" / "metrics.fid=False,samples_per_class=2"
    with np.load(folder / "samples.npz") as npz:
        assert npz["arr_0"].shape == (20, 8, 8, 3) and npz["arr_0"].dtype == np.uint8
    assert f"): done: {folder}" in results["sample"].stdout
    evaluated = json.loads((tokenizer / "results.json").read_text())  # into the evaluated run
    assert evaluated["eval/weights"] == "ema" and evaluated["psnr"] > 0
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [".jobs", ".submitit", "multirun.yaml"]

    status = run_cli(app("sweep") + ["status", str(tmp_path / "tokenize")])  # the ledger reads these sweeps' job outcomes
    assert status.returncode == 0 and status.stdout.startswith(f"sweep {tmp_path / 'tokenize'}: 2 of 2 jobs done, 0 failed\n"), status
    assert f"samples=32): done: {tmp_path / 'tokenize' / tokenizer.name / 'samples=32'}" in status.stdout
    table = run_cli(app("sweep") + ["table", str(tmp_path / "eval")])
    assert table.returncode == 2 and table.stderr.startswith(f"error: {tmp_path / 'eval'} is a sweep of ibq-eval, whose jobs leave no training runs")


def test_two_ranks_of_a_slurm_job_tokenize_what_one_process_does(slurm, imported_ar: Path, tmp_path: Path):
    settings = [f"tokenizer_run={imported_ar / 'tokenizer'}", "samples=300", "shard_size=100"]
    one = BackgroundRun(app("tokenize") + settings + [f"hydra.run.dir={tmp_path / 'one'}"])
    ranks = run_cli(app("tokenize") + ["cluster=slurm", "cluster.tasks_per_node=2", "cluster.time_min=10", *settings,
                                       f"hydra.sweep.dir={tmp_path / 'ranks'}"], timeout=600)
    assert ranks.returncode == 0 and one.result(timeout=300).returncode == 0, ranks.stdout[-2000:] + ranks.stderr[-2000:]
    [folder] = [manifest.parent for manifest in (tmp_path / "ranks").rglob("manifest.json")]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [shard["count"] for shard in manifest["shards"]] == [100, 100, 100]
    for shard in manifest["shards"]:
        for kind in ("tokens", "labels"):
            np.testing.assert_array_equal(np.load(folder / shard[kind]), np.load(tmp_path / "one" / shard[kind]))
    [log] = (tmp_path / "ranks").glob(".submitit/*/*_0_log.out")
    assert "by 2 ranks" in log.read_text()  # srun's two tasks, each a rank of the job
    # A rank that dies ends the job step instead of leaving the other waiting in a collective.
    [script] = (tmp_path / "ranks").glob(".submitit/*/*_submission.sh")
    text = script.read_text()
    assert 0 <= text.find("\nexport SLURM_KILL_BAD_EXIT=1\n") < text.find("\nsrun ")


# -- refused before submission ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["cluster.partition=nope"], "cluster.partition=nope does not exist on this Slurm cluster; partitions: debug"),
        (["cluster.partition=debug,nope"], "cluster.partition=nope does not exist"),  # any job of the sweep
        (["cluster.gpus_per_node=16", "cluster.tasks_per_node=16"], "cluster.gpus_per_node=16 is more than cluster=slurm allows (max_gpus_per_node=8"),
        (["cluster.gpus_per_node=2", "cluster.tasks_per_node=1"], "each rank takes one GPU, so set cluster.tasks_per_node=2"),
        (["cluster.gpus_per_node=1"], "cluster.gpus_per_node=1, but the nodes of partition debug have at most 0 GPUs"),
        (["cluster.tasks_per_node=3"], "train.batch_size=8 (the global batch) is not divisible by the world size 3"),
        (["cluster.tasks_per_node=2", "train.micro_batch_size=3"], "not divisible by train.micro_batch_size=3 x world size 2 = 6"),
        (["deepspeed=zero3", "+deepspeed.zero_optimization.round_robin_gradients=true"],
         "deepspeed=zero3 does not support deepspeed.zero_optimization.round_robin_gradients"),
        # what the training job itself refuses, from its config alone
        (["train.precision=fp8"], "train.precision='fp8' is invalid; valid: auto, fp32, bf16, fp16"),
        (["quantizer.entropy_temperature=0,0.01"], "quantizer.entropy_temperature=0 is invalid: it must be > 0"),
        (["quantizer=lfq", "codebook_size=256,1000"], "quantizer.codebook_size=1000 is invalid for lfq: it must be a power of two"),
    ],
)
def test_bad_cluster_settings_get_one_line_and_submit_nothing(slurm, tmp_path: Path, overrides: list[str], expected: str):
    quantizers = [] if any(o.startswith("quantizer=") for o in overrides) else ["quantizer=ibq,vq"]
    result = submit(["-m", "cluster=slurm", *quantizers, *overrides, *SHORT, f"hydra.sweep.dir={tmp_path / 'sweep'}"], timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line, line
    assert not (tmp_path / "sweep").exists()  # holds the submitit folder of anything submitted


@pytest.mark.parametrize(("command", "expected"), [
    (["sample", "run_dir={generator}", "sampling.top_p=0.9,2"], "sampling.top_p=2 is invalid: it must be in (0, 1] (1: off)"),
    (["eval", "run_dir={tokenizer}", "weights=ema,both"], "weights='both' is invalid; valid: ema, live"),
    (["tokenize", "tokenizer_run={tokenizer}", "shard_size=64,0"], "shard_size=0 is invalid: it must be a positive integer"),
])
def test_a_bad_value_in_any_job_of_a_work_app_sweep_submits_nothing(slurm, imported_ar: Path, tmp_path: Path, command: list[str],
                                                                    expected: str):
    name, *overrides = command
    paths = {"generator": imported_ar / "ar", "tokenizer": imported_ar / "tokenizer"}
    result = run_cli(app(name) + ["-m", "cluster=slurm", *(o.format(**paths) for o in overrides), f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                     timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {expected}", result.stderr[-2000:]
    assert not (tmp_path / "sweep").exists()


def test_slurm_without_sbatch_is_one_line_and_inspection_works(tmp_path: Path):
    result = submit(["cluster=slurm", *SHORT, f"hydra.sweep.dir={tmp_path / 'sweep'}"], timeout=120, PATH="/nonexistent")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: cluster=slurm needs Slurm's sbatch, which is not on PATH here: submit from a Slurm login node, "
        "or start the local cluster with `make slurm-up` (--cfg, dry_run=true and ibq-sweep plan work without it)"
    )
    assert not (tmp_path / "sweep").exists()
    # Only submitting needs Slurm: the job's Hydra config shows on a laptop (a dry run: test_hydra_native).
    shown = submit(["cluster=slurm", "cluster.sbatch={constraint: a100}", "--cfg", "all"], timeout=120, PATH="/nonexistent")
    assert shown.returncode == 0, shown.stderr[-2000:]
    composed = OmegaConf.create(shown.stdout)
    assert composed.hydra.launcher._target_.endswith("SlurmLauncher")
    assert composed.hydra.launcher.additional_parameters == {"constraint": "a100"}  # the dict override, into an open node


def test_local_parallel_runs_on_one_node_only(tmp_path: Path):
    result = submit(["cluster=local_parallel", "cluster.nodes=2", *SHORT, f"hydra.sweep.dir={tmp_path / 'sweep'}"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: cluster.nodes=2: cluster=local_parallel runs on this machine only (nodes=1)"


# -- the glue, without a cluster -------------------------------------------------------------------
def test_a_failed_job_is_told_in_one_line():
    from ibq.cli.common import failure_line

    no_result = ("Job 13 (task: 0) with path /s/.submitit/13/13_0_result.pkl\nhas not produced any output (state: FAILED)\n"
                 "Error stream produced:\n----------------------------------------\nwarning: something\n")
    assert failure_line(Exception(no_result)) == (
        "job 13 (task 0) ended FAILED without a result; its log: /s/.submitit/13/13_0_log.err "
        "(the sweep's other jobs keep running: see sacct or squeue)")
    told = no_result + "error: /run/checkpoints/last.pt belongs to another configuration\n"
    assert "job 13 (task 0) failed: /run/checkpoints/last.pt belongs to another configuration;" in failure_line(Exception(told))
    raised = ("Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent call last):\n"
              "  File x\nRuntimeError: boom\n----------------------\nYou can check full logs with 'job.stderr(0)' and "
              "'job.stdout(0)'or at paths:\n  - /s/.submitit/7_2/7_2_0_log.err\n  - /s/.submitit/7_2/7_2_0_log.out")
    assert failure_line(Exception(raised)).startswith("job 7_2 (task 0) raised RuntimeError: boom; its log: /s/.submitit/7_2/7_2_0_log.err")


def test_only_swept_placement_and_checked_keys_multiply_the_checked_jobs():
    from ibq.cli.checks import checked_variants

    overrides = ["logger=none,wandb", "codebook_size=256,1024", "cluster=slurm", "cluster.tasks_per_node=1,2", "seed=0",
                 "optim.lr=interval(1e-5,1e-3)", "quantizer=ibq,lfq"]
    assert checked_variants(overrides) == [
        ["logger=none", "cluster=slurm", "seed=0", f"codebook_size={size}", f"cluster.tasks_per_node={tasks}", f"quantizer={name}"]
        for size in (256, 1024) for tasks in (1, 2) for name in ("ibq", "lfq")
    ]
