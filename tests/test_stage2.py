"""Stage II end to end: tokenizer -> token shards -> transformer -> CFG samples -> gFID; resume, W&B, the
paper scales' sizes, and the bad input a user can give, each refused with one line."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import IBQ_TRAIN_AR, REPO, SMALL_AR, BackgroundRun, children, cli_env, error_line, kill_at_first_checkpoint, read_jsonl, run_cli
from ibq.config import build
from ibq.engine.tokens import TokenShards, load_tokenizer_run
from ibq.engine.train_ar import load_ar_run, sample_images
from ibq.errors import UserError
from ibq.generation.sampling import sample
from ibq.ledger.runs import discover
from ibq.metrics.adm import to_adm_array
from ibq.report.curves import runs_at_steps
from ibq.report.table import build_table

IBQ_TOKENIZE = [sys.executable, "-m", "ibq.cli.tokenize"]
IBQ_SAMPLE = [sys.executable, "-m", "ibq.cli.sample"]
TORCHRUN_TOKENIZE = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ibq.cli.tokenize"]
PAPER_PARAMETERS = {"B": 343.0e6, "L": 649.6e6, "XL": 1.076e9, "XXL": 2.063e9}
# Four samples per photo against 144 training crops: few, but enough for the trained/untrained gap.
FEW_SAMPLES = ["samples_per_class=4", "reference.limit=144"]


def compose_config(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


# -- configs and sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["tiny", *PAPER_PARAMETERS])
def test_model_scale_serves_both_stages(scale: str):
    stage_two = compose_config("train_ar", f"model_scale={scale}")
    assert stage_two.transformer._target_ == "ibq.models.transformer.Transformer"
    assert stage_two.sampling.cfg_scale >= 1 and stage_two.ar_train.epochs > stage_two.ar_train.warmup_epochs
    assert OmegaConf.missing_keys(stage_two) == set()
    stage_one = compose_config("train", f"model_scale={scale}")
    expected_levels = 3 if scale == "tiny" else 5  # tiny: x4 downsampling; the paper's tokenizer: x16
    assert len(stage_one.model.encoder.ch_mult) == expected_levels
    side = stage_one.data.resolution // 2 ** (expected_levels - 1)
    assert stage_two.transformer.block_size == side * side


def test_paper_scales_keep_the_reference_schedule_and_sampling():
    settings = {scale: compose_config("train_ar", f"model_scale={scale}") for scale in PAPER_PARAMETERS}
    assert [settings[s].ar_train.epochs for s in PAPER_PARAMETERS] == [300, 350, 400, 450]
    assert [settings[s].ar_train.warmup_epochs for s in PAPER_PARAMETERS] == [6, 7, 8, 9]
    assert [settings[s].ar_train.final_lr_ratio for s in PAPER_PARAMETERS] == [0.1, 0.1, 0.01, 0.01]
    assert [settings[s].ar_train.final_weight_decay for s in PAPER_PARAMETERS] == [0, 0, 0, 0.08]
    assert [settings[s].sampling.cfg_scale for s in PAPER_PARAMETERS] == [2.25, 2.0, 2.35, 2.85]
    assert [settings[s].sampling.temperature for s in PAPER_PARAMETERS] == [1.1, 1.0, 1.15, 1.2]
    for cfg in settings.values():
        assert cfg.ar_train.batch_size == 768 and cfg.ar_optim.lr == 3e-4 and list(cfg.ar_optim.betas) == [0.9, 0.95]
        assert cfg.ar_optim.weight_decay == 0.05 and cfg.ar_optim.grad_clip == 1.0 and cfg.transformer.class_dropout == 0.1


def test_gfid_reference_images_follow_the_runs_scale_unless_given(tmp_path: Path):
    """reference.limit=auto: 2048 real images at the CPU scale, whose FID-network pass takes minutes there, and
    10000 at the paper's scales (or where the run's scale is unknown); a number given is kept."""
    from ibq.cli.sample import eval_config
    from ibq.engine.evaluation_run import reference_selection

    def limit(scale: str | None, *overrides: str) -> int:
        run_dir = tmp_path / str(scale)
        run_dir.mkdir(exist_ok=True)
        if scale is not None:
            (run_dir / "run.json").write_text(json.dumps({"choices": {"model_scale": scale}}))
        reference = eval_config(compose_config("sample", f"run_dir={run_dir}", *overrides), run_dir, tmp_path / "samples.npz").reference
        return reference_selection(reference, own_data=True, run_dir=run_dir)[1]

    assert [limit(scale) for scale in ("tiny", "B", "XXL", None)] == [2048, 10000, 10000, 10000]
    assert limit("tiny", "reference.limit=500") == 500


def test_transformer_sizes_given_as_auto_follow_the_tokenizer():
    """A sweep across tokenizers of different codebooks (-m tokenizer_run=a,b transformer.vocab_size=auto):
    each job's transformer predicts its own tokenizer's codes, as many as its encoder makes of an image."""
    from ibq.engine.job_config import meta_transformer, sized_transformer

    tokenizer = Path("/runs/ibq_8192")
    cfg = compose_config("train_ar", "transformer.vocab_size=auto", "transformer.block_size=auto", "data.resolution=64")
    sized = sized_transformer(cfg, 8192, 4, tokenizer)
    assert (sized.vocab_size, sized.block_size) == (8192, 16 * 16) and cfg.transformer.vocab_size == "auto"
    given = compose_config("train_ar", "transformer.vocab_size=1024", "transformer.block_size=auto", "data.resolution=64")
    with pytest.raises(UserError, match=r"^transformer.vocab_size=1024 differs from the codebook of tokenizer_run=/runs/ibq_8192 "
                                        r"\(8192 codes\): set transformer.vocab_size=8192, or auto to follow the tokenizer$"):
        sized_transformer(given, 8192, 4, tokenizer)
    with pytest.raises(UserError, match="data.resolution=64 is not a multiple of the downsampling factor 24"):
        sized_transformer(cfg, 8192, 24, tokenizer)
    dry = compose_config("train_ar", "transformer.block_size=auto", "dry_run=true")  # no tokenizer_run to size it
    with pytest.raises(UserError, match="^transformer.block_size=auto follows tokenizer_run, which is not given"):
        meta_transformer(dry)


@pytest.mark.slow
@pytest.mark.parametrize("scale", PAPER_PARAMETERS)
def test_dry_run_reports_the_paper_parameter_counts(scale: str, tmp_path: Path):
    result = run_cli(IBQ_TRAIN_AR + [f"model_scale={scale}", "dry_run=true", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    total = int(re.search(r"total\s+\S+M\s+\(([\d,]+)\)", result.stdout).group(1).replace(",", ""))
    assert abs(total / PAPER_PARAMETERS[scale] - 1) < 0.01, total
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_dry_run_into_a_closed_pipe_ends_quietly():
    """`ibq-train-ar model_scale=XL dry_run=true | head -1`: the exit status a shell gives a writer stopped
    by SIGPIPE, and no traceback."""
    dry = subprocess.Popen(IBQ_TRAIN_AR + ["model_scale=XL", "dry_run=true"], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=cli_env())
    dry.stdout.close()
    assert dry.wait(timeout=300) == 141 and dry.stderr.read() == ""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("app", "key", "outputs", "expected"),
    [
        (IBQ_SAMPLE, "run_dir", None, "does not exist"),  # its folder: <run_dir>/samples/<overrides>
        (IBQ_TOKENIZE, "tokenizer_run", "tokens", "does not exist"),  # outputs/tokens/<run's name>/<overrides>
        (IBQ_TRAIN_AR, "tokenizer_run", "train_ar", "has no checkpoint"),
    ],
)
def test_a_run_to_read_that_is_not_there_is_refused_before_any_folder_is_made(tmp_path: Path, app, key, outputs, expected):
    run_dir = tmp_path / f"run-{tmp_path.name}"
    if expected == "has no checkpoint":
        run_dir.mkdir()
    result = run_cli(app + [f"{key}={run_dir}"])
    assert result.returncode == 2
    assert error_line(result).startswith(f"error: {key}={run_dir} {expected}")
    assert list(tmp_path.iterdir()) == ([run_dir] if run_dir.exists() else []) and not any(run_dir.rglob("*"))
    assert outputs is None or not (REPO / "outputs" / outputs / run_dir.name).exists()


# -- on the small tokenizer: a refusal, the resume -------------------------------------------------------


@pytest.mark.slow
def test_vocabulary_other_than_the_codebook_is_refused(small_tokenizer_run: Path, tmp_path: Path):
    line = error_line(run_cli(IBQ_TRAIN_AR + [f"tokenizer_run={small_tokenizer_run}", f"hydra.run.dir={tmp_path / 'ar'}"]))
    assert "transformer.vocab_size=1024 differs from the codebook" in line and "256 codes" in line
    assert not (tmp_path / "ar").exists()


@pytest.mark.slow
def test_a_sweep_across_tokenizers_trains_each_on_its_codes_and_the_ledger_knows_its_runs(small_tokenizer_run: Path, tmp_path: Path):
    """-m over two tokenizer runs of different codebooks and grids: a folder per tokenizer run, each transformer
    sized by its tokenizer, and ibq-sweep plans the signatures the jobs record (a trained and an imported run)."""
    from ibq.cli.import_official import main as ibq_import
    from ibq.ledger.sweep import load_sweep

    official = REPO / "tests" / "fixtures" / "official"
    ibq_import([str(official / "ar_tiny.ckpt"), "--config", str(official / "ar_tiny_config.json"), "-o", str(tmp_path / "official"), "logger=none"])
    imported, sweep = tmp_path / "official" / "tokenizer", tmp_path / "sweep"
    small = [o for o in SMALL_AR if not o.startswith("transformer.vocab_size=")]
    result = run_cli(IBQ_TRAIN_AR + ["-m", f"tokenizer_run={small_tokenizer_run},{imported}", "transformer.vocab_size=auto",
                                     "transformer.block_size=auto", *small, "ar_train.steps=4", f"hydra.sweep.dir={sweep}"])
    assert result.returncode == 0 and "2 of 2 jobs done" in result.stdout, result.stderr[-3000:]
    dirname = "ar_train.batch_size=16,ar_train.steps=4,transformer.block_size=auto,transformer.depth=2,transformer.ffn_hidden=512," \
              "transformer.heads=2,transformer.vocab_size=auto,transformer.width=128"
    for tokenizer, codes, tokens in ((small_tokenizer_run, 256, 8 * 8), (imported, 64, 16 * 16)):
        state = torch.load(sweep / tokenizer.name / dirname / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
        assert (state["config"]["transformer"]["vocab_size"], state["config"]["transformer"]["block_size"]) == (codes, tokens)
    # Each job's summary names the next step, its folder quoted for a shell and for Hydra.
    nexts = [shlex.split(line.split("next", 1)[1].split("   (")[0]) for line in result.stdout.splitlines() if line.startswith("  next ")]
    assert [(program, OverridesParser.create().parse_override(override).value()) for program, override in nexts] == \
        [("ibq-sample", str(sweep / tokenizer.name / dirname)) for tokenizer in (small_tokenizer_run, imported)]

    jobs = load_sweep(sweep).jobs
    assert [job.run.path.parent.name for job in jobs] == [small_tokenizer_run.name, imported.name]
    assert all(job.state == "done" and job.job.signature == job.run.signature for job in jobs)
    status = run_cli([sys.executable, "-m", "ibq.cli.sweep", "status", str(sweep)])
    assert "2 jobs: 2 done" in status.stdout and "changed" not in status.stdout and status.stdout.count(" 4/4 ") == 2, status.stdout
    table = run_cli([sys.executable, "-m", "ibq.cli.sweep", "table", str(sweep)]).stdout
    assert "transformer.vocab_size" in table.splitlines()[1] and table.splitlines()[1].rstrip().endswith("loss"), table


@pytest.mark.slow
def test_killed_run_resumes_exactly_and_logs_to_wandb(small_tokenizer_run: Path, tmp_path: Path):
    """Tokens on the fly (no shards) here; the resumed half logs to W&B (offline)."""
    steps = [f"tokenizer_run={small_tokenizer_run}", *SMALL_AR, "ar_train.steps=12", "ar_train.checkpoint_every=4",
             "ar_train.log_every=1", "ar_train.grid_classes=0"]
    reference = BackgroundRun(IBQ_TRAIN_AR + steps + [f"hydra.run.dir={tmp_path / 'reference'}"])

    run_dir = tmp_path / "interrupted"
    killed_at = kill_at_first_checkpoint(IBQ_TRAIN_AR + steps + [f"hydra.run.dir={run_dir}"], run_dir)
    assert killed_at < 12, "the run finished before it could be killed"

    resumed = run_cli(IBQ_TRAIN_AR + steps + ["logger=wandb", f"hydra.run.dir={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = reference.result()
    assert reference.returncode == 0, reference.stderr[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert [r["step"] for r in record["resumes"]] == [killed_at] and record["status"] == "completed"
    assert record["wandb"]["mode"] == "offline" and record["wandb"]["id"] == record["signature"]
    assert list(Path(record["wandb"]["dir"]).glob("run-*.wandb"))

    expected = read_jsonl(tmp_path / "reference" / "metrics.jsonl")
    actual = read_jsonl(run_dir / "metrics.jsonl")
    assert [line["step"] for line in actual] == list(range(1, 13))
    for a, b in zip(actual, expected):
        for key in ("loss", "grad_norm", "lr", "weight_decay"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    resumed_state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    reference_state = torch.load(tmp_path / "reference" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name, value in reference_state.items():
        torch.testing.assert_close(resumed_state[name], value, rtol=1e-5, atol=1e-6)


# -- several ranks -----------------------------------------------------------------------------------
TORCHRUN_AR = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ibq.cli.train_ar"]
# Dropout off: each rank would draw its own masks. Two ranks of 8 sequences then compute the one-process
# batch of 16 up to float summation order.
MATCHING_AR = ["transformer.class_dropout=0", "transformer.embed_dropout=0", "transformer.resid_dropout=0",
               "transformer.ffn_dropout=0", "ar_train.steps=10", "ar_train.checkpoint_every=5", "ar_train.log_every=1"]


@pytest.fixture(scope="module")
def one_process_ar(small_tokenizer_run: Path, tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("one_process_ar") / "run"
    result = run_cli(IBQ_TRAIN_AR + [f"tokenizer_run={small_tokenizer_run}", *SMALL_AR, *MATCHING_AR, "ar_train.grid_classes=0",
                                     f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return read_jsonl(run_dir / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", ["none", "zero2", "zero3"])
def test_two_ranks_stop_on_the_signal_resume_and_match_one_process(small_tokenizer_run: Path, one_process_ar: list[dict],
                                                                   tmp_path: Path, deepspeed: str):
    run_dir = tmp_path / "run"
    args = TORCHRUN_AR + [f"tokenizer_run={small_tokenizer_run}", *SMALL_AR, *MATCHING_AR, "ar_train.grid_classes=2",
                          f"deepspeed={deepspeed}", "cluster.requeue_signal=USR2", f"hydra.run.dir={run_dir}"]
    log = tmp_path / "run.log"

    def launch() -> subprocess.Popen:
        with log.open("a") as out:
            return subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=cli_env())

    # First run: the requeue signal reaches one rank only, after step 3.
    process = launch()
    deadline = time.time() + 600
    while process.poll() is None and time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(read_jsonl(run_dir / "metrics.jsonl")) >= 3:
            break
        time.sleep(0.2)
    workers = children(process.pid)
    assert len(workers) == 2, log.read_text()[-3000:]
    os.kill(workers[-1], signal.SIGUSR2)
    assert process.wait(timeout=600) != 0
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted", log.read_text()[-3000:]
    stopped_at = record["requeues"][0]["step"]
    assert 3 <= stopped_at < 10
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["step"] == stopped_at and len(checkpoint["rng_by_rank"]) == 2
    if deepspeed != "none":
        assert checkpoint["deepspeed"] == {"tag": f"step{stopped_at:07d}", "stage": int(deepspeed[-1]), "world_size": 2}

    # The same command resumes from that checkpoint and finishes; the sample grid comes from the whole weights.
    assert launch().wait(timeout=600) == 0, log.read_text()[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and [r["step"] for r in record["resumes"]] == [stopped_at]
    assert record["distributed"] == {"world_size": 2, "launcher": "torchrun", "micro_batch_size": 8, "accumulation": 1,
                                     "deepspeed_stage": None if deepspeed == "none" else int(deepspeed[-1])}
    results = json.loads((run_dir / "results.json").read_text())
    assert results["step"] == 10 and (run_dir / results["sample_grid"]).is_file()
    actual = read_jsonl(run_dir / "metrics.jsonl")
    assert [line["step"] for line in actual] == [line["step"] for line in one_process_ar] == list(range(1, 11))
    for a, b in zip(actual, one_process_ar):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["cluster=local_parallel", "cluster.tasks_per_node=3"], "ar_train.batch_size=16 (the global batch) is not divisible by the world size 3"),
        (["deepspeed=zero2", "ar_train.precision=fp16"], "ar_train.precision=fp16 with deepspeed=zero2 is not supported"),
        (["deepspeed=zero1", "+deepspeed.config.gradient_clipping=2.0"], "deepspeed.config.gradient_clipping is set from ibq's own keys"),
        # the job's own refusals, before the run it reads is even looked for
        (["ar_train.precision=fp8"], "ar_train.precision='fp8' is invalid; valid: auto, fp32, bf16, fp16"),
        (["transformer.heads=5"], "with transformer.heads=5 is invalid: width must be heads x a head size divisible by 4"),
    ],
)
def test_what_the_job_would_refuse_is_refused_before_launch(tmp_path: Path, overrides: list[str], expected: str):
    line = error_line(run_cli(IBQ_TRAIN_AR + ["tokenizer_run=/nowhere", *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"]))
    assert expected in line, line
    assert not (tmp_path / "sweep").exists()


# -- the tiny path end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stage2")


@pytest.fixture(scope="module")
def tokenizer_training(workdir: Path):
    """600 steps: after 300, decoding random tokens still scores a better FID than decoding real crops' tokens,
    so no generator could beat an untrained one; from about 600 steps on, real tokens decode clearly better."""
    training = BackgroundRun([sys.executable, "-m", "ibq.cli.train", "train.steps=600", "logger=none", "eval.rfid=false",
                              "codebook_size=256", f"hydra.run.dir={workdir / 'tokenizer'}"])
    yield training
    training.process.kill()  # when no test waited for it


@pytest.fixture(autouse=True)
def tokenizer_trains_from_the_first_slow_test(request):
    """The 600 steps take minutes on one core, while the tests before the first one that needs them leave the
    other core idle: the training starts with the module's first slow test, when a selected test needs it."""
    module_needs_it = any("tokenizer_run" in item.fixturenames for item in request.session.items
                          if getattr(item, "module", None) is request.module)
    if module_needs_it and request.node.get_closest_marker("slow"):
        request.getfixturevalue("tokenizer_training")


@pytest.fixture(scope="module")
def tokenizer_run(workdir: Path, tokenizer_training: BackgroundRun) -> Path:
    result = tokenizer_training.result(timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "tokenizer"


@pytest.fixture(scope="module")
def token_shards(workdir: Path, tokenizer_run: Path) -> Path:
    tokens = workdir / "tokens"
    result = run_cli(IBQ_TOKENIZE + [f"tokenizer_run={tokenizer_run}", "samples=2048", "shard_size=1000", f"hydra.run.dir={tokens}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return tokens


@pytest.fixture(scope="module")
def ar_run(workdir: Path, tokenizer_run: Path, token_shards: Path) -> Path:
    run_dir = workdir / "ar"
    result = run_cli(IBQ_TRAIN_AR + [f"tokenizer_run={tokenizer_run}", f"tokens={token_shards}", "ar_train.steps=300",
                                     "ar_optim.lr=1e-3", "ar_train.keep_every=100", *SMALL_AR, f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"kept checkpoints      3 (ar_train.keep_every): step0000100.pt … step0000300.pt; ibq-sample run_dir={run_dir} step=<N> "
            f"samples one") in result.stdout
    return run_dir


def code_frequencies(tokens: torch.Tensor, codebook_size: int = 256) -> torch.Tensor:
    return torch.bincount(tokens.flatten(), minlength=codebook_size).double() / tokens.numel()


def untrained_copy(run_dir: Path, destination: Path) -> Path:
    """The same run with its transformer replaced by a fresh initialisation."""
    shutil.copytree(run_dir, destination, ignore=shutil.ignore_patterns("samples"))
    checkpoint = destination / "checkpoints" / "last.pt"
    state = torch.load(checkpoint, weights_only=True)
    torch.manual_seed(0)
    state["model"] = build(OmegaConf.create(state["config"]).transformer).state_dict()
    torch.save(state, checkpoint)
    return destination


@pytest.mark.slow
def test_interrupted_tokenizing_continues_after_its_written_shards(tokenizer_run: Path, token_shards: Path, tmp_path: Path):
    tokens = tmp_path / "tokens"
    command = IBQ_TOKENIZE + [f"tokenizer_run={tokenizer_run}", "samples=2048", "shard_size=1000", f"hydra.run.dir={tokens}"]
    first = BackgroundRun(command)
    deadline = time.time() + 300
    while not (tokens / "progress.json").exists() and time.time() < deadline and first.process.poll() is None:
        time.sleep(0.05)
    first.process.send_signal(signal.SIGINT)  # after the first of three shards
    stopped = first.result(timeout=300)
    assert stopped.returncode == 130 and not (tokens / "manifest.json").exists(), stopped.stderr[-2000:]
    written = json.loads((tokens / "progress.json").read_text())["shards"]
    assert 0 < len(written) < 3

    result = run_cli(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(written)} of 3 shards are already written; continuing after them" in result.stderr
    assert not (tokens / "progress.json").exists()
    ours, reference = (json.loads((folder / "manifest.json").read_text()) for folder in (tokens, token_shards))
    assert {k: v for k, v in ours.items() if k != "created"} == {k: v for k, v in reference.items() if k != "created"}
    for shard in ours["shards"]:  # the same shards as one uninterrupted pass
        for kind in ("tokens", "labels"):
            np.testing.assert_array_equal(np.load(tokens / shard[kind]), np.load(token_shards / shard[kind]))


@pytest.mark.slow
def test_two_ranks_take_the_shards_in_turns_and_one_process_continues_their_job(tokenizer_run: Path, token_shards: Path, tmp_path: Path):
    tokens = tmp_path / "tokens"
    settings = [f"tokenizer_run={tokenizer_run}", "samples=4000", "shard_size=1000", f"hydra.run.dir={tokens}"]
    ranks = BackgroundRun(TORCHRUN_TOKENIZE + settings)
    deadline = time.time() + 300
    while not (tokens / "progress.json").exists() and time.time() < deadline and ranks.process.poll() is None:
        time.sleep(0.05)
    ranks.process.send_signal(signal.SIGTERM)  # after the first round: shard 0 from rank 0, shard 1 from rank 1
    stopped = ranks.result(timeout=300)
    assert stopped.returncode != 0 and not (tokens / "manifest.json").exists(), stopped.stderr[-2000:]
    assert [shard["tokens"] for shard in json.loads((tokens / "progress.json").read_text())["shards"]] == ["tokens-00000.npy", "tokens-00001.npy"]

    result = run_cli(IBQ_TOKENIZE + settings)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 of 4 shards are already written; continuing after them" in result.stderr
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert [shard["count"] for shard in manifest["shards"]] == [1000] * 4 and manifest["num_classes"] == 18
    # Items 0..2047 are token_shards', tokenized by one process in one pass.
    for kind in ("tokens", "labels"):
        ours = np.concatenate([np.load(tokens / shard[kind]) for shard in manifest["shards"]])
        reference = np.concatenate([np.load(token_shards / f"{kind}-{index:05d}.npy") for index in range(3)])
        np.testing.assert_array_equal(ours[:2048], reference)


@pytest.mark.slow
def test_token_shards_hold_the_tokenizers_tokens(tokenizer_run: Path, token_shards: Path):
    manifest = json.loads((token_shards / "manifest.json").read_text())
    assert manifest["samples"] == 2048 and manifest["grid"] == [8, 8] and manifest["num_classes"] == 18
    assert manifest["tokenizer"]["codebook_size"] == 256 and manifest["dtype"] == "int16"
    assert [shard["count"] for shard in manifest["shards"]] == [1000, 1000, 48]
    run = load_tokenizer_run(tokenizer_run, torch.device("cpu"))
    assert manifest["tokenizer"]["signature"] == run.signature == json.loads((tokenizer_run / "run.json").read_text())["signature"]

    # The first pass is the training stream, tokenized (compared over one tokenization batch of 64 items).
    shards = TokenShards(token_shards, seed=0)
    photos = build(run.config.data, seed=0).train
    images, photo_labels = zip(*(photos[position] for position in range(64)))
    tokens, labels = zip(*(shards[position] for position in range(64)))
    assert list(labels) == list(photo_labels)
    assert torch.equal(torch.stack(tokens), run.encode(torch.stack(images)))
    later = sorted(int(shards[2048 + i][0].sum()) for i in range(2048))
    assert later == sorted(int(shards[i][0].sum()) for i in range(2048))  # the second pass: a permutation


@pytest.mark.slow
def test_trained_model_samples_are_closer_to_the_data_and_are_scored(workdir: Path, ar_run: Path, token_shards: Path):
    record = json.loads((ar_run / "run.json").read_text())
    results = json.loads((ar_run / "results.json").read_text())
    assert record["status"] == "completed" and record["kind"] == "generator" and record["tokens"]
    losses = [line["loss"] for line in read_jsonl(ar_run / "metrics.jsonl")]
    assert losses[-1] < losses[0] - 0.5, losses  # from ln(256) = 5.55
    assert (ar_run / results["sample_grid"]).is_file()

    cache = f"reference.cache_dir={workdir / 'fid_stats'}"
    trained = run_cli(IBQ_SAMPLE + [f"run_dir={ar_run}", *FEW_SAMPLES, cache, f"hydra.run.dir={workdir / 'trained'}"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    untrained_run = untrained_copy(ar_run, workdir / "untrained_ar")
    untrained = run_cli(IBQ_SAMPLE + [f"run_dir={untrained_run}", *FEW_SAMPLES, cache, f"hydra.run.dir={workdir / 'untrained'}"])
    assert untrained.returncode == 0, untrained.stderr[-3000:]

    scores = {name: json.loads((workdir / name / "results.json").read_text()) for name in ("trained", "untrained")}
    # At 72 images of 32 px against 144 crops, gFID is mostly its small-sample bias: the two runs' gFIDs were
    # 281.6 and 284.3 with torch 2.14, 276.7 and 276.3 with torch 2.4. How far the drawn codes are from the
    # codes of the training images tells them apart (total variation of code frequencies: 0.12-0.13 against 0.26-0.30).
    shards = TokenShards(token_shards, seed=0)
    data_codes = torch.stack([shards[position][0] for position in range(2048)]).long()
    labels = torch.arange(18).repeat_interleave(8)
    distance = {}
    for name, run_dir in (("trained", ar_run), ("untrained", untrained_run)):
        drawn = sample(load_ar_run(run_dir, torch.device("cpu")).model, labels, **scores[name]["sampling"], seed=0)
        distance[name] = 0.5 * (code_frequencies(drawn) - code_frequencies(data_codes)).abs().sum().item()
    print(f"gFID trained {scores['trained']['gfid']:.1f}, untrained {scores['untrained']['gfid']:.1f}; code frequencies' distance "
          f"from the data's {distance['trained']:.3f}, {distance['untrained']:.3f}")
    assert distance["trained"] < 0.6 * distance["untrained"], distance
    assert all(np.isfinite(score["gfid"]) for score in scores.values())
    assert scores["trained"]["gfid/samples"] == 72 and scores["trained"]["gfid/reference_samples"] == 144
    assert scores["untrained"]["eval/reference_cached"] is True
    assert scores["trained"]["sampling"] == {"cfg_scale": 2.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    assert json.loads((ar_run / "results.json").read_text())["gfid"] == scores["trained"]["gfid"]  # recorded in the run

    with np.load(workdir / "trained" / "samples.npz") as npz:
        samples = npz["arr_0"]
    assert samples.shape == (72, 32, 32, 3) and samples.dtype == np.uint8
    assert (workdir / "trained" / "grid.png").is_file()


@pytest.mark.slow
def test_a_kept_checkpoint_is_sampled_and_scored_into_the_curve_at_its_step(workdir: Path, ar_run: Path):
    assert sorted(path.name for path in (ar_run / "checkpoints").iterdir()) == ["last.pt", "step0000100.pt", "step0000200.pt", "step0000300.pt"]
    earlier, last = load_ar_run(ar_run, torch.device("cpu"), step=100), load_ar_run(ar_run, torch.device("cpu"))
    assert earlier.step == 100 and not torch.equal(earlier.model.head.weight, last.model.head.weight)
    final = (ar_run / "results.json").read_text()
    result = run_cli(IBQ_SAMPLE + [f"run_dir={ar_run}", "step=100", *FEW_SAMPLES, f"reference.cache_dir={workdir / 'fid_stats'}"])
    assert result.returncode == 0, result.stderr[-3000:]

    (folder,) = (ar_run / "samples").glob("*step=100*")  # the step names the sampling's folder
    sampling = json.loads((folder / "results.json").read_text())
    assert sampling["step"] == 100 and sampling["checkpoint"] == str(ar_run / "checkpoints" / "step0000100.pt")
    assert f"samples of {ar_run} (step 100, step0000100.pt)" in result.stdout
    assert (ar_run / "results.json").read_text() == final  # the run's end keeps its figures
    logged = read_jsonl(ar_run / "metrics.jsonl")[-1]
    assert logged["step"] == 100 and logged["gfid"] == sampling["gfid"]
    assert f"{ar_run / 'metrics.jsonl'} (at step 100; results.json keeps the figures of the run's end (step 300))" in result.stdout
    runs, metrics = runs_at_steps(discover(ar_run), None, [100])  # the row of ibq-sweep table --steps 100
    assert metrics[0] == "gfid" and build_table(runs, metrics, at_steps=True).rows[0].cell("gfid").values == [sampling["gfid"]]


@pytest.mark.slow
def test_samples_are_deterministic_per_seed(ar_run: Path, tmp_path: Path):
    result = run_cli(IBQ_SAMPLE + [f"run_dir={ar_run}", "classes=[3,7]", "samples_per_class=2", "seed=5", "metrics.fid=false",
                                   "sampling.top_p=0.9", f"hydra.run.dir={tmp_path / 'out'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "out" / "samples.npz") as npz:
        written = npz["arr_0"]
    run = load_ar_run(ar_run, torch.device("cpu"))
    settings = {"cfg_scale": 2.0, "temperature": 1.0, "top_k": 0, "top_p": 0.9}
    again = sample_images(run.model, run.tokenizer_run, torch.tensor([3, 3, 7, 7]), settings, torch.Generator().manual_seed(5), torch.float32)
    assert written.shape == (4, 32, 32, 3) and np.array_equal(written, to_adm_array(again))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["classes=[0,18]"], "class index 18 is outside the model's classes"),
        (["sampling.cfg_scale=-1"], "sampling.cfg_scale=-1"),
        (["sampling.top_p=0"], "sampling.top_p=0"),
        (["sampling.top_p=1.5"], "sampling.top_p=1.5"),
        (["step=150"], "step=150: {run} has no checkpoint of that step; it kept steps 100, 200, 300, and last.pt is step 300"),
        (["step=0"], "step=0 is invalid: it must be a positive integer"),
    ],
)
def test_bad_sampling_input_is_refused(ar_run: Path, tmp_path: Path, overrides: list[str], expected: str):
    line = error_line(run_cli(IBQ_SAMPLE + [f"run_dir={ar_run}", *overrides, f"hydra.run.dir={tmp_path / 'out'}"]))
    assert expected.format(run=ar_run) in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_token_shards_of_another_tokenizer_are_refused(tokenizer_run: Path, token_shards: Path, tmp_path: Path):
    foreign = tmp_path / "foreign_tokens"
    shutil.copytree(token_shards, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["tokenizer"]["signature"] = "0123456789ab"
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    line = error_line(run_cli(IBQ_TRAIN_AR + [f"tokenizer_run={tokenizer_run}", f"tokens={foreign}", *SMALL_AR,
                                              f"hydra.run.dir={tmp_path / 'ar'}"]))
    assert "were written by another tokenizer" in line and "0123456789ab" in line
    assert not (tmp_path / "ar").exists()
