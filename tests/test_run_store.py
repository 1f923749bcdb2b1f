"""The run directory as a safe store: results merged, one writer at a time, a torn metrics tail, another
configuration's record refused, no temporary file left by a failed write, nothing non-finite checkpointed,
W&B that hangs or lacks a key, sweeps that keep going, and a terminal status on every exit."""

from __future__ import annotations

import errno
import fcntl
import http.server
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import IBQ_TRAIN, ONE_CROP_PER_PHOTO, QUICK, BackgroundRun, error_line, read_jsonl, run_cli
from ibq.cli.callbacks import count_jobs, unusable_directory
from ibq.engine.checkpoint import checkpoint_at_step, keep_checkpoint, load_checkpoint, non_finite_tensors, save_checkpoint, stop_if_state_not_finite
from ibq.engine.ranks import Ranks
from ibq.engine.session import RunSession
from ibq.errors import Terminated, TrainingDiverged, UserError
from ibq.runs.lock import RunLock
from ibq.runs.record import MetricsLog, RunRecord, atomic_write_text, merge_results


def test_results_are_merged_not_rewritten(tmp_path: Path):
    path = tmp_path / "results.json"
    merge_results(path, {"rfid": 50.0, "psnr": 20.0})
    merge_results(path, {"rfid": 60.0, "imagenet/rfid": 70.0, "eval/dataset": "imagenet"})
    merge_results(path, {"rfid": 50.0, "psnr": 21.0})  # the training's final evaluation again
    assert json.loads(path.read_text()) == {"rfid": 50.0, "psnr": 21.0, "imagenet/rfid": 70.0, "eval/dataset": "imagenet"}


def merge_and_log(path: Path, writer: int, count: int) -> None:
    for index in range(count):
        merge_results(path / "results.json", {f"writer{writer}/{index}": index})
        MetricsLog(path / "metrics.jsonl").append(index, {f"writer{writer}": index})


def test_results_and_metrics_written_by_processes_at_once_keep_every_entry(tmp_path: Path):
    # ibq-eval and ibq-sample score into a run (a sweep's jobs side by side, or while it trains).
    writers = [multiprocessing.get_context("fork").Process(target=merge_and_log, args=(tmp_path, writer, 200)) for writer in range(3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [writer.exitcode for writer in writers] == [0, 0, 0]
    assert json.loads((tmp_path / "results.json").read_text()) == {f"writer{w}/{i}": i for w in range(3) for i in range(200)}
    assert len(MetricsLog(tmp_path / "metrics.jsonl").read()) == 600


def test_lock_names_its_holder_and_a_dead_holder_is_taken_over(tmp_path: Path):
    with RunLock(tmp_path):
        with pytest.raises(UserError, match=rf"in use by process \d+ on {socket.gethostname()}"):
            RunLock(tmp_path).__enter__()
    assert not (tmp_path / ".lock").exists()
    # A killed run leaves its lock file, but no lock: the next run takes it over.
    dead = {"pid": 999999, "host": "elsewhere", "since": "then", "command": ["ibq-train"]}
    (tmp_path / ".lock").write_text(json.dumps(dead))
    with RunLock(tmp_path) as lock:
        assert json.loads((tmp_path / ".lock").read_text())["pid"] != 999999
        assert lock.fd is not None
    assert not (tmp_path / ".lock").exists()
    # Its forked data-loader workers may hold the lock a few seconds longer: a dead holder is waited for.
    (tmp_path / ".lock").write_text(json.dumps({**dead, "host": socket.gethostname()}))
    orphan = os.open(tmp_path / ".lock", os.O_RDWR)
    fcntl.flock(orphan, fcntl.LOCK_EX)
    threading.Timer(0.5, os.close, [orphan]).start()
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_lock_in_a_path_below_a_file_or_on_a_read_only_disk_is_one_line(tmp_path: Path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        RunLock(tmp_path / "file" / "run").__enter__()
    with pytest.raises(UserError, match=r"cannot be written \(Read-only file system\)"):
        with monkeypatch.context() as patched:
            patched.setattr(os, "open", lambda *args: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
            RunLock(tmp_path / "run").__enter__()
    assert unusable_directory(tmp_path / "file" / "run") == f"{tmp_path / 'file'} is a file, not a directory"
    assert unusable_directory(tmp_path / "new" / "run") is None


def test_torn_metrics_tail_is_dropped_and_repaired(tmp_path: Path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append(1, {"loss": 1.0})
    log.append(2, {"loss": 0.5})
    with log.path.open("a") as file:
        file.write('{"loss": 0.2, "st')  # a disk that filled mid-line
    assert [line["step"] for line in log.read()] == [1, 2]
    log.truncate_after(2)
    log.append(3, {"loss": 0.1})
    assert [line["step"] for line in read_jsonl(log.path)] == [1, 2, 3]
    log.path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        log.read()


def test_run_directory_of_another_configuration_is_refused_without_a_checkpoint(tmp_path: Path):
    record = RunRecord(tmp_path)
    record.update(signature="aaaaaaaaaaaa", overrides=["quantizer=vq"])
    RunSession(tmp_path, Ranks(0, 0, 1), "aaaaaaaaaaaa")  # the same configuration resumes
    with pytest.raises(UserError, match=r"another configuration \(signature aaaaaaaaaaaa, overrides: quantizer=vq"):
        RunSession(tmp_path, Ranks(0, 0, 1), "bbbbbbbbbbbb")


def fill_disk(tmp: Path) -> None:
    Path(tmp).write_bytes(b"x" * 1000)  # part of the file made it to disk
    raise OSError(errno.ENOSPC, "No space left on device", str(tmp))


def test_failed_writes_leave_no_temporary_file(tmp_path: Path, monkeypatch):
    atomic_write_text(tmp_path / "run.json", "{}")
    monkeypatch.setattr(Path, "write_text", lambda self, text: fill_disk(self))
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "run.json", '{"status": "failed"}')
    monkeypatch.undo()
    monkeypatch.setattr(torch, "save", lambda state, tmp: fill_disk(tmp))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"step": 1})
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "run.json"]


def test_full_disk_ends_the_run_failed_with_one_line(tmp_path: Path, monkeypatch):
    session = RunSession(tmp_path, Ranks(0, 0, 1), "aaaaaaaaaaaa")
    session.record = RunRecord(tmp_path)
    session.record.update(status="running")
    with pytest.raises(UserError, match="cannot write to .*last.pt: No space left on device"):
        with session.failures_recorded():
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "last.pt"))
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "failed"
    # When run.json cannot be written either, the reason still reaches the user.
    monkeypatch.setattr(RunRecord, "save", lambda self: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(UserError, match="Read-only file system"):
        with session.failures_recorded():
            raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))


def test_ctrl_c_and_sigterm_end_the_run_interrupted(tmp_path: Path):
    session = RunSession(tmp_path, Ranks(0, 0, 1), "aaaaaaaaaaaa")
    session.record = RunRecord(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with session.failures_recorded():
            raise KeyboardInterrupt
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "interrupted"
    with pytest.raises(Terminated):
        session.run(lambda: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(5))
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "interrupted" and record["error"].startswith("terminated (SIGTERM)")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_non_finite_state_is_never_checkpointed(tmp_path: Path):
    checkpoint = tmp_path / "last.pt"
    good = {"step": 4, "tokenizer": {"w": torch.ones(3)}, "opt_d": {"state": {0: {"exp_avg": torch.zeros(2)}}}}
    stop_if_state_not_finite(4, good, checkpoint, torch.device("cpu"))
    save_checkpoint(checkpoint, good)
    bad = {
        "step": 6,
        "tokenizer": {"w": torch.full((3,), 1e10)},  # large but finite
        "discriminator": {"conv.weight": torch.tensor([1.0, float("nan")])},
        "ema": {"shadow.w": torch.tensor([float("inf")])},
        "opt_g": {"state": {0: {"exp_avg_sq": torch.tensor([float("inf")])}}},
        "rng": {"torch": torch.zeros(4, dtype=torch.uint8)},
    }
    assert non_finite_tensors(bad) == ["discriminator.conv.weight", "ema.shadow.w", "opt_g.state.0.exp_avg_sq"]
    with pytest.raises(TrainingDiverged, match=rf"non-finite values at step 6 in discriminator.conv.weight.*last good checkpoint is {checkpoint} \(step 4\)"):
        stop_if_state_not_finite(6, bad, checkpoint, torch.device("cpu"))
    assert load_checkpoint(checkpoint)["step"] == 4


def test_a_kept_checkpoint_holds_the_weights_and_stays_as_it_was_when_the_next_one_is_written(tmp_path: Path):
    checkpoint = tmp_path / "checkpoints" / "last.pt"
    state = {"step": 2, "signature": "abc", "config": {"seed": 0}, "tokenizer": {"w": torch.ones(3)}, "ema": {"shadow.w": torch.ones(3)},
             "discriminator": {"w": torch.ones(3)}, "opt_g": {"state": {0: {"exp_avg": torch.ones(1000)}}}, "rng": {"python": [1]}}
    save_checkpoint(checkpoint, state)
    (tmp_path / "checkpoints" / ".step0000002.pt.tmp").write_bytes(b"a killed keep's leftover")
    kept = keep_checkpoint(checkpoint, 2)
    assert kept == tmp_path / "checkpoints" / "step0000002.pt"
    assert sorted(load_checkpoint(kept)) == ["config", "discriminator", "ema", "signature", "step", "tokenizer"]  # what evaluation,
    # sampling and fine-tuning read
    save_checkpoint(checkpoint, {**state, "step": 4, "tokenizer": {"w": torch.zeros(3)}})
    assert load_checkpoint(kept)["step"] == 2 and load_checkpoint(kept)["tokenizer"]["w"].tolist() == [1.0, 1.0, 1.0]
    assert load_checkpoint(checkpoint)["step"] == 4
    assert sorted(path.name for path in checkpoint.parent.iterdir()) == ["last.pt", "step0000002.pt"]


def test_a_step_names_the_checkpoint_kept_then_or_last_pt_and_is_refused_where_there_is_none(tmp_path: Path):
    checkpoint = tmp_path / "checkpoints" / "last.pt"
    for step in range(10, 80, 10):
        save_checkpoint(checkpoint, {"step": step, "model": {}})
        keep_checkpoint(checkpoint, step)
    save_checkpoint(checkpoint, {"step": 75, "model": {}})  # the run's end, not a multiple of keep_every
    assert checkpoint_at_step(tmp_path, 20, "run_dir", "generator") == checkpoint.with_name("step0000020.pt")
    assert checkpoint_at_step(tmp_path, 75, "run_dir", "generator") == checkpoint
    with pytest.raises(UserError, match=r"^step=25: .* has no checkpoint of that step; it kept steps 10, 20, …, 70 \(7 in all\), "
                                        r"and last.pt is step 75$"):
        checkpoint_at_step(tmp_path, 25, "run_dir", "generator")
    for kept in checkpoint.parent.glob("step*.pt"):
        kept.unlink()
    with pytest.raises(UserError, match=r"^step=20: .* it kept none \(keep_every\), and last.pt is step 75$"):
        checkpoint_at_step(tmp_path, 20, "run_dir", "generator")
    with pytest.raises(UserError, match=r"^run_dir=.*missing does not exist"):
        checkpoint_at_step(tmp_path / "missing", 20, "run_dir", "generator")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"junk\n"])  # the last, a KeyError in torch's pre-zip reader
def test_unreadable_checkpoint_is_one_line(tmp_path: Path, content: bytes):
    from ibq.engine.checkpoint import load_run

    (tmp_path / "last.pt").write_bytes(content)
    with pytest.raises(UserError, match=r"last.pt cannot be read \(UnpicklingError: it is not what torch.save writes \(a torn file, "
                                        r"or another kind\)\): restore it, or move it away to start this run from step 0$"):
        load_checkpoint(tmp_path / "last.pt")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(content)
    with pytest.raises(UserError, match=r"last.pt cannot be read \(UnpicklingError: it is not what torch.save writes"):
        load_run(tmp_path / "run", "run_dir")  # memory-mapped, which torch refuses for a file not in its zip format


class RunsACommand:
    """What a crafted pickle can hold: an object whose unpickling calls a function of the writer's choice."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_is_read_as_data_and_one_that_would_run_code_is_refused(tmp_path: Path):
    import random

    import numpy as np

    from ibq.engine.checkpoint import set_rng_state

    # Written before numpy's RNG state was kept as numbers: its numpy array is read, and the state restored.
    np.random.seed(7)
    torch.save({"step": 3, "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}},
               tmp_path / "older.pt")
    expected = np.random.rand(4)
    set_rng_state(load_checkpoint(tmp_path / "older.pt")["rng"])
    np.testing.assert_array_equal(np.random.rand(4), expected)

    marker = tmp_path / "ran"
    torch.save({"step": 3, "config": RunsACommand(marker)}, tmp_path / "crafted.pt")
    with pytest.raises(UserError, match=r"crafted.pt cannot be read \(UnpicklingError: it holds posix.system, which is no tensor or Python data, and is read as data only\)"):
        load_checkpoint(tmp_path / "crafted.pt")
    assert not marker.exists()


def test_load_run_reads_any_run_and_refuses_bad_ones_in_one_line(tmp_path: Path):
    from ibq.engine.checkpoint import load_run

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    checkpoint = run_dir / "checkpoints" / "last.pt"
    problems = {"missing": "tokenizer_run={} does not exist: point it at the run directory of an ibq-train",
                "empty": "tokenizer_run={} has no checkpoint (checkpoints/last.pt)",
                "zero bytes": "checkpoint {}/checkpoints/last.pt cannot be read",
                "foreign": "tokenizer_run={} is not an ibq-train or ibq-import tokenizer run: {}/checkpoints/last.pt lacks config, ema"}
    for problem, expected in problems.items():
        if problem == "zero bytes":
            checkpoint.write_bytes(b"")
        elif problem == "foreign":
            torch.save({"step": 3, "tokenizer": {}}, checkpoint)
        path = tmp_path / "nowhere" if problem == "missing" else run_dir
        with pytest.raises(UserError) as raised:
            load_run(path, "tokenizer_run")
        assert str(raised.value).startswith(expected.format(path, path)) and "\n" not in str(raised.value), problem

    weights = {"w": torch.ones(2)}
    torch.save({"step": 3, "signature": "abc", "config": {"seed": 1}, "tokenizer": weights,
                "ema": {"shadow.w": torch.zeros(2), "num_updates": torch.tensor(3)}}, checkpoint)
    run = load_run(run_dir, "tokenizer_run")
    assert (run.run_dir, run.step, run.signature, run.config.seed) == (run_dir, 3, "abc", 1)
    assert list(run.tokenizer_weights("ema")) == ["w"] and run.tokenizer_weights("ema")["w"].sum() == 0  # the EMA prefix stripped
    assert run.tokenizer_weights("live")["w"].sum() == 2
    (run_dir / "run.json").write_text("{}")
    assert load_run(checkpoint, "checkpoint", outside_a_run=True).run_dir == run_dir  # a checkpoint file in a run
    with pytest.raises(UserError, match="is a file: point it at the run directory"):
        load_run(checkpoint, "run_dir")


def test_the_runs_a_job_reads_are_checked_without_loading_them(tmp_path: Path):
    from omegaconf import OmegaConf

    from ibq.cli.checks import check_run_inputs

    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    refused = {("sample", "run_dir", "???"): "run_dir is required: the run directory of an ibq-train-ar or ibq-import generator run",
               ("sample", "run_dir", missing): f"run_dir={missing} does not exist: point it at the run directory of an ibq-train-ar or ibq-import generator run",
               ("train_ar", "tokenizer_run", empty): f"tokenizer_run={empty} has no checkpoint (checkpoints/last.pt)",
               ("eval", "checkpoint", missing): f"checkpoint={missing} does not exist: point it at a checkpoint file or the run directory"}
    for (app, key, value), expected in refused.items():
        with pytest.raises(UserError) as raised:
            check_run_inputs(OmegaConf.create({key: value}), app)
        assert str(raised.value).startswith(expected), raised.value
    for app, cfg in [("train", {"init_from": None}), ("train_ar", {"tokenizer_run": missing, "dry_run": True}),
                     ("eval", {"run_dir": missing, "samples": "samples.npz"}), ("train", {"train": {"extend_from": None}})]:
        check_run_inputs(OmegaConf.create(cfg), app)  # optional, a dry run, generation: nothing to read


def test_a_kept_checkpoint_starts_a_fine_tuning_run_named_by_its_run_and_step(tmp_path: Path):
    from omegaconf import OmegaConf

    from ibq.cli.checks import check_run_inputs
    from ibq.engine.checkpoint import fine_tuning_parent

    parent_dir = tmp_path / "parent"
    checkpoint = parent_dir / "checkpoints" / "last.pt"
    save_checkpoint(checkpoint, {"step": 4, "signature": "abc", "config": {"seed": 0}, "tokenizer": {"w": torch.ones(3)},
                                 "ema": {"shadow.w": torch.ones(3)}, "opt_g": {}})
    (parent_dir / "run.json").write_text(json.dumps({"overrides": ["model_scale=tiny"]}))
    kept = keep_checkpoint(checkpoint, 4)
    save_checkpoint(checkpoint, {"step": 6, "signature": "abc", "config": {"seed": 0}, "tokenizer": {"w": torch.zeros(3)},
                                 "ema": {"shadow.w": torch.zeros(3)}})
    check_run_inputs(OmegaConf.create({"init_from": str(kept)}), "train")
    parent, record = fine_tuning_parent(str(kept), "tokenizer", tmp_path / "child")
    assert record == {"run_dir": str(parent_dir), "checkpoint": str(kept), "signature": "abc", "step": 4, "imported": None}
    assert parent.overrides == ["model_scale=tiny"] and parent.run.state["tokenizer"]["w"].tolist() == [1.0, 1.0, 1.0]

    outside = tmp_path / "elsewhere.pt"
    shutil.copyfile(kept, outside)
    expected = f"init_from={outside} lies outside a run directory: give a run directory, or a checkpoint it kept (<run>/checkpoints/step<N>.pt)"
    for refuse in (lambda: check_run_inputs(OmegaConf.create({"init_from": str(outside)}), "train"),
                   lambda: fine_tuning_parent(str(outside), "tokenizer", tmp_path / "child")):
        with pytest.raises(UserError) as raised:
            refuse()
        assert str(raised.value) == expected


class Silent:
    """A TCP server that accepts connections and never answers."""

    def __enter__(self) -> str:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        return f"http://127.0.0.1:{self.server.getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self.server.close()


class Answering(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(200)
        self.end_headers()

    do_GET = do_POST = do_HEAD

    def log_message(self, *args):
        pass


def test_wandb_that_hangs_or_lacks_a_key_falls_back_to_offline(tmp_path: Path, monkeypatch, caplog):
    from ibq.runs.wandb_mirror import WandbMirror

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    with Silent() as url:
        started = time.monotonic()
        mirror = WandbMirror(tmp_path / "hang", "run0000hang", {}, "ibq", mode="online", base_url=url)
        assert time.monotonic() - started < 60  # bounded: the server never answers
        assert mirror.mode == "offline"
        mirror.finish()
    assert "cannot be reached: logging offline instead (no answer within" in caplog.text

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answering)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        mirror = WandbMirror(tmp_path / "nokey", "run00000key", {}, "ibq", mode="online", base_url=f"http://127.0.0.1:{server.server_port}")
        assert mirror.mode == "offline"
        mirror.finish()
    finally:
        server.shutdown()
    assert "no W&B API key: set WANDB_API_KEY or run `wandb login`" in caplog.text


@pytest.mark.slow
def test_run_directory_that_is_a_file_is_one_line(tmp_path: Path):
    (tmp_path / "run").write_text("not a directory")
    result = run_cli(IBQ_TRAIN + QUICK + [f"hydra.run.dir={tmp_path / 'run'}"], timeout=120)
    assert "is a file, not a directory" in error_line(result)
    assert (tmp_path / "run").read_text() == "not a directory"


@pytest.mark.slow
def test_second_writer_is_refused_and_ctrl_c_ends_the_run_interrupted(tmp_path: Path):
    # A long run holds the directory: a second writer is refused before it writes; Ctrl-C ends it "interrupted".
    longer = tmp_path / "longer"
    args = IBQ_TRAIN + QUICK + [ONE_CROP_PER_PHOTO, "train.steps=100000", "eval.rfid=false", f"hydra.run.dir={longer}"]
    first = BackgroundRun(args)
    deadline = time.time() + 300
    while not (longer / "metrics.jsonl").exists() and time.time() < deadline and first.process.poll() is None:
        time.sleep(0.1)
    assert (longer / "metrics.jsonl").exists(), first.result(timeout=1).stderr[-3000:]
    second = run_cli(args, timeout=300)
    assert f"is in use by process {first.process.pid}" in error_line(second)
    first.process.send_signal(signal.SIGINT)
    stopped = first.result(timeout=120)
    stderr = stopped.stderr
    assert stopped.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C)")
    record = json.loads((longer / "run.json").read_text())
    assert record["status"] == "interrupted" and record["ended"]
    assert not (longer / ".lock").exists()
    steps = [line["step"] for line in read_jsonl(longer / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no step twice


@pytest.mark.slow
@pytest.mark.parametrize("app", ["tokenize", "sample"])
def test_a_folder_that_another_job_writes_is_refused_and_left_as_it_was(tmp_path: Path, app: str):
    from test_official import AR, AR_CONFIG, ibq_import

    ibq_import([str(AR), "--config", str(AR_CONFIG), "-o", str(tmp_path / "imported"), "logger=none"])
    reads = {"tokenize": [f"tokenizer_run={tmp_path / 'imported' / 'tokenizer'}", "samples=16"],
             "sample": [f"run_dir={tmp_path / 'imported' / 'ar'}", "samples_per_class=1", "metrics.fid=false"]}
    folder = tmp_path / "out"
    with RunLock(folder):  # another job of the app, writing there
        result = run_cli([sys.executable, "-m", f"ibq.cli.{app}", *reads[app], f"hydra.run.dir={folder}"], timeout=120)
        assert error_line(result).startswith(f"error: run directory {folder} is in use by process {os.getpid()} on {socket.gethostname()}")
        assert [path.name for path in folder.iterdir()] == [".lock"]


def test_sweep_counts_its_jobs_as_the_basic_sweeper_makes_them():
    from omegaconf import OmegaConf

    config = OmegaConf.create({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": {"quantizer": "ibq,vq", "codebook_size": "1024,8192"}},
        "overrides": {"task": ["codebook_size=256,1024,4096", "seed=range(0,3)", "train.steps=3"]},
    }})
    assert count_jobs(config) == 2 * 3 * 3  # the command line's codebook_size replaces the sweep file's


@pytest.mark.slow
def test_sweep_goes_on_past_a_failed_job_and_says_which_failed(tmp_path: Path):
    # A photo scikit-image does not ship passes the checks before the sweep (they read no data) and fails job 1.
    sweep_dir = tmp_path / "sweep"
    result = run_cli(IBQ_TRAIN + ["-m", "data.photos=[nope],[astronaut,chelsea]", "train.steps=2", "train.log_every=1", "logger=none",
                                  "eval.rfid=false", ONE_CROP_PER_PHOTO, f"hydra.sweep.dir={sweep_dir}"], timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    out = result.stdout
    assert "job 1/2: data.photos=[nope]" in out and "job 2/2: data.photos=[astronaut,chelsea]" in out
    failure = "failed: data.photos contains 'nope', which scikit-image does not ship"
    assert f"job 1/2: {failure}" in out and "job 2/2: done" in out
    assert "1 of 2 jobs done, 1 failed" in out
    summary = out.split("jobs done")[1]
    assert "job 1/2 (data.photos=[nope] " in summary and f"): {failure}" in summary
    assert "job 2/2 (data.photos=[astronaut,chelsea] " in summary and "): done" in summary
    records = [json.loads(p.read_text()) for p in sweep_dir.glob("*/run.json")]
    assert [r["status"] for r in records] == ["completed"]
    # What the job would refuse from its config alone stops the sweep before it starts.
    refused = run_cli(IBQ_TRAIN + ["-m", "train.steps=0,2", f"hydra.sweep.dir={tmp_path / 'refused'}"])
    assert error_line(refused) == "error: train.steps=0 is invalid: it must be a positive integer"
    assert not (tmp_path / "refused").exists()


def test_media_and_arrays_leave_no_temporary_file_when_the_disk_is_full(tmp_path: Path, monkeypatch):
    from PIL import Image

    from ibq.engine.media import save_grid
    from ibq.runs.record import save_npy

    save_grid(torch.zeros(2, 3, 8, 8), tmp_path / "grid.png", nrow=1)
    assert Image.open(tmp_path / "grid.png").size == (128 + 4, 2 * 128 + 6)
    monkeypatch.setattr(Image.Image, "save", lambda self, tmp, *args, **kwargs: fill_disk(tmp))
    with pytest.raises(OSError):
        save_grid(torch.zeros(2, 3, 8, 8), tmp_path / "grid2.png", nrow=1)
    monkeypatch.setattr("numpy.save", lambda file, array: fill_disk(Path(file.name)))
    with pytest.raises(OSError):
        save_npy(tmp_path / "codes.npy", torch.zeros(3).numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
