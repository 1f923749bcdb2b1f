from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ibq.config import hydra_value

REPO = Path(__file__).resolve().parents[1]
IBQ_TRAIN = [sys.executable, "-m", "ibq.cli.train"]
# Small and fast: a handful of steps, one validation crop per photo, no W&B unless a test asks.
QUICK = ["train.steps=4", "train.log_every=1", "train.checkpoint_every=2", "logger=none"]
ONE_CROP_PER_PHOTO = "data.val_crops_per_photo=1"
IBQ_TRAIN_AR = [sys.executable, "-m", "ibq.cli.train_ar"]
# A CPU-sized transformer on a 256-code tokenizer; a few hundred steps learn the photos' token statistics.
SMALL_AR = ["transformer.vocab_size=256", "transformer.depth=2", "transformer.width=128", "transformer.heads=2",
            "transformer.ffn_hidden=512", "ar_train.batch_size=16", "ar_train.log_every=25", "logger=none"]


# The apps that build a model: a test that starts one belongs to the slow tier (`make test-fast` skips it).
MODEL_APPS = {"ibq.cli.train", "ibq.cli.train_ar", "ibq.cli.eval", "ibq.cli.tokenize", "ibq.cli.sample",
              "ibq-train", "ibq-train-ar", "ibq-eval", "ibq-tokenize", "ibq-sample"}
_running: dict[str, pytest.Item] = {}


def pytest_configure(config: pytest.Config) -> None:
    # A shell without job control (`make test &`, a CI runner) starts the suite with SIGINT ignored, and the
    # apps started here would inherit that: they get Ctrl-C as a terminal delivers it instead.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # The suite's runs keep their FID statistics in a cache of the suite's own, which the apps started here
    # inherit: a real set's features are computed once per test process, and the user's cache is left alone.
    os.environ["IBQ_CACHE_DIR"] = tempfile.mkdtemp(prefix="ibq-test-cache-")
    # A pytest-xdist worker shares the cores with the others: torch's threads, one per core by default, would
    # then outnumber them, and its OpenMP threads spin at every barrier waiting for one that is not running
    # (a test that trains in-process took 41 s instead of 27 beside one busy process).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or workers) // workers))


def pytest_unconfigure(config: pytest.Config) -> None:
    cache = os.environ.pop("IBQ_CACHE_DIR", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


def pytest_runtest_protocol(item: pytest.Item, nextitem) -> None:
    _running["item"] = item


def require_slow_mark(args: list[str]) -> None:
    """Fails a test outside the slow tier that starts a model app, so that the fast tier stays fast."""
    item = _running.get("item")
    app = next((Path(str(arg)).name for arg in args if str(arg) in MODEL_APPS or Path(str(arg)).name in MODEL_APPS), None)
    if app and item is not None and item.get_closest_marker("slow") is None:
        pytest.fail(f"{item.nodeid} starts {app}: mark it @pytest.mark.slow", pytrace=False)


def cli_env(**extra: str) -> dict[str, str]:
    # One thread per process: runs compared step by step must reduce in the same order,
    # and jobs submitted through sbatch inherit it on a machine with few cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", **extra}


def run_cli(args: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    require_slow_mark(args)
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=cli_env(), **kwargs)


class BackgroundRun:
    """A CLI run started now and collected later, so that two independent runs of one thread each use both
    cores of a 2-core machine. Its output goes to temporary files: a pipe nobody reads would stall it."""

    def __init__(self, args: list[str]):
        require_slow_mark(args)
        self.output, self.errors = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(args, cwd=REPO, stdout=self.output, stderr=self.errors, text=True, env=cli_env())

    def result(self, timeout: float = 600) -> subprocess.CompletedProcess:
        """Its exit status and output; one still running after `timeout` is killed (status -9), so that the
        caller's assertion shows what it printed."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.process.kill()  # no-op once it has ended
            self.process.wait()
        self.output.seek(0)
        self.errors.seek(0)
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, self.output.read(), self.errors.read())


@contextlib.contextmanager
def cpu_threads(count: int):
    """torch's intra-op threads set to `count` inside the block: a reduction whose order follows the threads
    shows up only with several."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_args(run_dir: Path, *overrides: str, quick: bool = True) -> list[str]:
    quick_args = QUICK + ([] if any(o.startswith("data=") for o in overrides) else [ONE_CROP_PER_PHOTO])
    return IBQ_TRAIN + (quick_args if quick else []) + list(overrides) + [f"hydra.run.dir={hydra_value(run_dir)}"]


def train(run_dir: Path, *overrides: str, quick: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_cli(train_args(run_dir, *overrides, quick=quick), timeout=timeout)


def kill_at_first_checkpoint(args: list[str], run_dir: Path) -> int:
    """Runs the CLI `args` and kills it (SIGKILL, no warning) as soon as `run_dir` holds a checkpoint;
    returns the checkpoint's step."""
    import torch

    require_slow_mark(args)
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    checkpoint = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return torch.load(checkpoint, weights_only=True)["step"]


# Every way a Python-side read of a tensor waits for the device, and the collectives that would.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")
COLLECTIVES = ("all_reduce", "barrier", "broadcast")


def record_host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now until `monkeypatch.undo()`, the name of each host read of a tensor and each collective,
    in the list returned (the collectives are recorded, not run)."""
    import torch
    import torch.distributed

    reads: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _name=name, _original=original, **k: reads.append(_name) or _original(self, *a, **k))
    for name in COLLECTIVES:
        monkeypatch.setattr(torch.distributed, name, lambda *a, _name=name, **k: reads.append(_name))
    return reads


@pytest.fixture
def whole_graph():
    """compile(fn) -> (compiled fn, the graphs Dynamo made of it). fullgraph=True, so a graph break raises;
    the backend runs each traced graph as it is, so what torch.compile hands Inductor on CUDA is checked
    on CPU without generating kernels."""
    import torch

    def compile_whole(fn, **options):
        graphs = []

        def keep(graph_module, example_inputs):
            graphs.append(graph_module)
            return graph_module.forward

        return torch.compile(fn, backend=keep, fullgraph=True, **options), graphs

    torch.compiler.reset()
    yield compile_whole
    torch.compiler.reset()


def graph_host_reads(graph_module) -> list[str]:
    """The traced graph's reads of a value back to the host: Dynamo keeps `.item()` inside the graph, where
    it would wait for the device, and CUDA graphs step aside for it."""
    return [node.format_node() for node in graph_module.graph.nodes if node.op == "call_method" and node.target in HOST_READS]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a user error prints; fails the test if stderr has more than that."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, result.stdout[-2000:]
    assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ") or line.startswith("Traceback")]
    assert len(errors) == 1, result.stderr[-3000:]
    return lines[-1]


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """An ImageNet-layout folder of real photo crops (2 classes), plus one corrupt file."""
    import numpy as np
    from PIL import Image
    from skimage import data

    root = tmp_path / "imagenet"
    photos = {"cat": data.chelsea(), "coffee": data.coffee()}
    for split, count in (("train", 3), ("val", 2)):
        for name, photo in photos.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                crop = photo[i * 20 : i * 20 + 200, i * 30 : i * 30 + 260]
                Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{name}_{i}.png")
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"this is not a jpeg")
    return root


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory) -> Path:
    """The embedded photos packed by ibq-data pack: 18 samples in 5 shards."""
    from ibq.data.pack import pack

    output = tmp_path_factory.mktemp("photo_shards") / "photos"
    pack("photos", output, samples_per_shard=4)
    return output


@pytest.fixture
def gpu_reported(monkeypatch: pytest.MonkeyPatch):
    """`gpu_reported((major, minor), name, triton=True)`: the GPU torch.cuda reports from here on, on any
    machine, and whether the triton package is there, for code that asks before any CUDA tensor exists."""
    import importlib.util

    import torch

    find_spec = importlib.util.find_spec

    def report(capability: tuple[int, int], name: str = "NVIDIA H200", triton: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        if not triton:
            monkeypatch.setattr(importlib.util, "find_spec", lambda module, *args: None if module == "triton" else find_spec(module, *args))

    return report


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.fixture(scope="session")
def small_tokenizer_run(tmp_path_factory) -> Path:
    """A 256-code tokenizer trained for a few steps: enough to give stage II its tokens."""
    run_dir = tmp_path_factory.mktemp("small_tokenizer") / "run"
    result = train(run_dir, "codebook_size=256", "eval.rfid=false")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def wandb_records(run_dir: Path, folder: str = "offline-run-*") -> list:
    """The records of a run's offline W&B file (LevelDB log format: 32 KiB blocks of chunks with a
    7-byte header: crc32, length, type; type 1 = a whole record, 2/3/4 = first/middle/last chunk). `folder`: a glob
    that matches one offline folder."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob(f"wandb/{folder}/*.wandb")
    raw, position, chunks, records = path.read_bytes(), 7, b"", []
    while position + 7 <= len(raw):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        if kind == 0:
            break
        chunks += raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records
