"""Paper presets (experiments/), sweep files (sweeps/) and their expansion by `ibq-sweep plan`, and a real
tiny codebook-scaling sweep read back by `ibq-sweep table` and `plot`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO, cli_env, run_cli
from ibq.ledger.plan import CONF_DIR, expand
from ibq.errors import UserError
from ibq.runs.record import STAGE_II_KEYS, signature, without_keys

IBQ_SWEEP = [sys.executable, "-m", "ibq.cli.sweep"]
STEPS_PER_EPOCH = 5005
# (K, epochs, LR-drop epochs) from the facts sheet 2.4
TOKENIZER_ROWS = [(1024, 330, [250, 300]), (8192, 280, [250]), (16384, 330, [250, 300]), (262144, 330, [250, 300])]
# (scale, depth, width, heads, AdaLN init, epochs, warm-up epochs, final LR ratio, final weight decay, CFG, temperature)
# from the facts sheet 3.2
AR_ROWS = [("B", 16, 1024, 16, 1e-3, 300, 6, 0.1, 0.0, 2.25, 1.1), ("L", 20, 1280, 20, 1e-3, 350, 7, 0.1, 0.0, 2.0, 1.0),
           ("XL", 24, 1536, 24, 1e-4, 400, 8, 0.01, 0.0, 2.35, 1.15), ("XXL", 30, 1920, 30, 1e-5, 450, 9, 0.01, 0.08, 2.85, 1.2)]
PRETRAIN_SIZES = (16384, 262144)  # facts sheet 2.5
STAGE_TWO = (CONF_DIR / "train_ar.yaml").exists()
# A few steps per job, one validation crop per photo, no rFID, no W&B: seconds per job on a CPU.
TINY_SWEEP = ["sweep=codebook_scaling", "model_scale=tiny", "codebook_size=256,1024", "train.steps=3",
              "data.val_crops_per_photo=1", "eval.rfid=false", "logger=none"]


def composed(*overrides: str, config_name: str = "train"):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def tiny_sweep_dir(base: Path) -> Path:
    """The 4-job tiny sweep (ibq, vq x 256, 1024), run once per test session; shared by the ledger and
    notebook tests through the session's base temporary folder."""
    sweep_dir = base / "tiny_sweep"
    if not (sweep_dir / ".complete").exists():
        result = run_cli([sys.executable, "-m", "ibq.cli.train", "-m", *TINY_SWEEP, f"hydra.sweep.dir={sweep_dir}"])
        assert result.returncode == 0, result.stderr[-3000:]
        (sweep_dir / ".complete").touch()
    return sweep_dir


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Path:
    return tiny_sweep_dir(tmp_path_factory.getbasetemp())


# -- experiments ---------------------------------------------------------------------------------------
def test_every_experiment_file_is_a_tested_row():
    rows = {f"ibq_{k}" for k, *_ in TOKENIZER_ROWS} | {f"ar_{row[0]}" for row in AR_ROWS} | {f"pretrain_{k}" for k in PRETRAIN_SIZES}
    assert {p.stem for p in (REPO / "experiments").glob("*.yaml")} == rows


@pytest.mark.parametrize("k,epochs,drops", TOKENIZER_ROWS)
def test_tokenizer_presets_carry_the_paper_schedule(k, epochs, drops):
    cfg = composed(f"experiment=ibq_{k}", "data.root=/imagenet")
    assert cfg.quantizer._target_ == "ibq.quantizers.IBQ"
    assert cfg.quantizer.codebook_size == k
    assert cfg.train.steps == epochs * STEPS_PER_EPOCH
    assert list(cfg.optim.lr_drop_steps) == [e * STEPS_PER_EPOCH for e in drops]
    assert cfg.optim.lr_drop_factor == 0.1
    assert cfg.optim.lr == 1e-4 and list(cfg.optim.betas) == [0.5, 0.9]
    assert cfg.train.precision == "bf16"
    assert cfg.train.ema_decay == 0.999
    # the paper's tokenizer on ImageNet
    assert cfg.data._target_ == "ibq.data.build_image_folder" and cfg.data.resolution == 256
    assert list(cfg.model.encoder.ch_mult) == [1, 1, 2, 2, 4] and cfg.model.embed_dim == 256


@pytest.mark.parametrize("k", PRETRAIN_SIZES)
def test_pretrain_presets_stream_the_mix_with_the_seeds_schedule(k):
    cfg = composed(f"experiment=pretrain_{k}", "data.root=/data/pretrain", "data.val.root=/imagenet")
    assert cfg.quantizer._target_ == "ibq.quantizers.IBQ" and cfg.quantizer.codebook_size == k
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.micro_batch_size) == (1_500_000, 256, 8)
    assert (cfg.optim.lr, list(cfg.optim.lr_drop_steps), cfg.eval.every, cfg.train.precision) == (1e-4, [], 5005, "bf16")
    assert list(cfg.model.encoder.ch_mult) == [1, 1, 2, 2, 4] and cfg.data.resolution == 256
    assert cfg.data._target_ == "ibq.data.build_shards" and cfg.data.crop == "center"
    assert sorted(cfg.data.sources) == ["capfusion", "cc12m", "cc3m", "journeydb", "laion_aesthetics_12m",
                                        "laion_aesthetics_v2", "laion_coco", "laion_hd"]
    assert cfg.data.sources.cc3m.urls == "/data/pretrain/cc3m" and cfg.data.val.root == "/imagenet"


@pytest.mark.skipif(not STAGE_TWO, reason="stage II (conf/train_ar.yaml) is not in this tree")
@pytest.mark.parametrize("row", AR_ROWS, ids=[row[0] for row in AR_ROWS])
def test_ar_presets_carry_the_paper_schedule_and_sampling(row):
    scale, depth, width, heads, alng, epochs, warmup, final_lr, final_wd, cfg_scale, temperature = row
    cfg = composed(f"+experiment=ar_{scale}", "tokenizer_run=/runs/ibq_16384", "data.root=/imagenet", config_name="train_ar")
    t = cfg.transformer
    assert (t.depth, t.width, t.heads, t.alng, t.vocab_size, t.num_classes, t.block_size) == (depth, width, heads, alng, 16384, 1000, 256)
    a = cfg.ar_train
    assert (a.epochs, a.warmup_epochs, a.final_lr_ratio, a.final_weight_decay, a.batch_size) == (epochs, warmup, final_lr, final_wd, 768)
    assert (cfg.ar_optim.lr, list(cfg.ar_optim.betas), cfg.ar_optim.weight_decay, cfg.ar_optim.grad_clip) == (3e-4, [0.9, 0.95], 0.05, 1.0)
    assert (cfg.sampling.cfg_scale, cfg.sampling.temperature, cfg.sampling.top_k, cfg.sampling.top_p) == (cfg_scale, temperature, 0, 1.0)
    assert cfg.data._target_ == "ibq.data.build_image_folder" and cfg.data.resolution == 256


@pytest.mark.skipif(not STAGE_TWO, reason="stage II (conf/train_ar.yaml) is not in this tree")
def test_ar_scaling_plans_the_four_scales():
    plan = expand(["+sweep=ar_scaling", "tokenizer_run=/runs/ibq_16384"], config_name="train_ar")
    assert [job.choices["model_scale"] for job in plan.jobs] == ["B", "L", "XL", "XXL"]
    assert plan.jobs[0].estimate.device_hours == pytest.approx(4 * 24 * 32, rel=0.01)  # issue #39: about 4 days on 32 NPUs


def test_a_preset_accepts_further_overrides():
    cfg = composed("experiment=ibq_16384", "data.root=/imagenet", "train.steps=10", "quantizer=vq")
    assert cfg.train.steps == 10 and cfg.quantizer._target_ == "ibq.quantizers.VQ" and cfg.quantizer.codebook_size == 16384


# -- sweep files ---------------------------------------------------------------------------------------
def choices_of(plan, *keys):
    return [tuple(job.choices[k] for k in keys) for job in plan.jobs]


def test_codebook_scaling_is_quantizer_by_the_four_sizes():
    plan = expand(["sweep=codebook_scaling"])
    sizes = ["1024", "8192", "16384", "262144"]
    assert choices_of(plan, "quantizer", "codebook_size") == [(q, k) for q in ("ibq", "vq") for k in sizes]
    assert len({job.signature for job in plan.jobs}) == 8


def test_command_line_replaces_a_sweep_key_and_adds_others():
    plan = expand(["sweep=codebook_scaling", "codebook_size=256,1024", "optim.lr=1e-4,2e-4"])
    assert len(plan.jobs) == 2 * 2 * 2
    assert {job.choices["codebook_size"] for job in plan.jobs} == {"256", "1024"}


def test_quantizer_zoo_has_every_quantizer_file_at_one_size():
    plan = expand(["sweep=quantizer_zoo"])
    assert sorted(job.choices["quantizer"] for job in plan.jobs) == sorted(p.stem for p in (CONF_DIR / "quantizer").glob("*.yaml"))
    assert {job.choices["codebook_size"] for job in plan.jobs} == {"16384"}


def test_a_glob_over_a_group_plans_each_config_it_matches_and_an_empty_one_is_refused():
    plan = expand(["quantizer=glob(*vq)", "codebook_size=1024,4096"])
    assert choices_of(plan, "quantizer", "codebook_size") == [(q, k) for q in ("ema_vq", "l2_vq", "simvq", "vq") for k in ("1024", "4096")]
    with pytest.raises(UserError, match=r"^quantizer=glob\(nope\*\) matches no config of quantizer; valid: ema_vq, fsq, ibq, l2_vq, lfq, simvq, vq$"):
        expand(["quantizer=glob(nope*)"])
    with pytest.raises(UserError, match=r"^seed=range\(5,5\) is a sweep of no values$"):
        expand(["seed=range(5,5)"])
    with pytest.raises(UserError, match=r"^optim.lr=interval\(1e-4,1e-3\): a search space, not a list, takes a search sweeper"):
        expand(["optim.lr=interval(1e-4,1e-3)"])


def test_plan_takes_a_deleting_override_first():
    plan = subprocess.run(IBQ_SWEEP + ["plan", "~logger", "seed=0,1"], cwd=REPO, capture_output=True, text=True, timeout=120, env=cli_env())
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "2 jobs: " in plan.stdout


def test_seeds_combine_with_another_sweep_file_or_the_command_line():
    alone = expand(["sweep=seeds"])
    assert [job.overrides for job in alone.jobs] == [[f"seed={s}", "sweep=seeds"] for s in range(3)]
    appended = expand(["sweep=codebook_scaling", "+sweep@_global_=seeds"])
    on_command_line = expand(["sweep=codebook_scaling", "seed=0,1,2"])
    assert len(appended.jobs) == len(on_command_line.jobs) == 24
    assert {j.signature for j in appended.jobs} == {j.signature for j in on_command_line.jobs}


def test_plan_signatures_equal_a_full_composition():
    """Jobs share a composition per set of group choices; each plain override must still give the
    signature a job composed on its own has (including through interpolations: quantizer.dim)."""
    plan = expand(["sweep=codebook_scaling", "codebook_size=256,1024", "model.embed_dim=32,48", "seed=0,1"])
    for job in plan.jobs[::5]:
        cfg = composed(*job.overrides)
        assert cfg.quantizer.dim == cfg.model.embed_dim
        assert signature(without_keys(cfg, STAGE_II_KEYS)) == job.signature, job.overrides  # as TokenizerTraining signs


def test_how_a_step_uses_its_device_neither_signs_nor_names_a_run():
    """The device keys change how a step is computed, not its result: a run resumes under other values,
    also a run from before quantizer.chunk_kernels existed (the key absent from its config)."""
    plain = composed("quantizer.chunk_size=64")
    device_keys = ["train.compile=true", "train.channels_last=false", "train.activation_checkpointing=true",
                   "quantizer.chunk_kernels=triton"]
    cfg = composed("quantizer.chunk_size=64", *device_keys)
    older = OmegaConf.to_container(plain, resolve=True)
    del older["quantizer"]["chunk_kernels"]
    older = OmegaConf.create(older)
    assert signature(cfg) == signature(plain) == signature(older)
    assert expand(device_keys).jobs[0].subdir == expand([]).jobs[0].subdir


def test_plan_of_64_jobs_marks_completed_ones(tmp_path):
    plan = expand(["sweep=codebook_scaling", "model_scale=tiny", "seed=0,1,2,3,4,5,6,7"])
    done = tmp_path / "runs" / "one"
    done.mkdir(parents=True)
    (done / "run.json").write_text(json.dumps({"signature": plan.jobs[9].signature, "status": "completed"}))
    (done / "results.json").write_text("{}")

    # In a folder without outputs/, so that runs completed under the repository's outputs/ cannot count (PYTHONPATH: this checkout's code).
    result = subprocess.run(IBQ_SWEEP + ["plan", "codebook_scaling", "model_scale=tiny", "seed=0,1,2,3,4,5,6,7", "--runs", str(tmp_path / "runs")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600, env=cli_env(PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert "64 jobs: 1 already completed, 63 to run" in result.stdout
    done_lines = [line for line in result.stdout.splitlines() if " done " in line]
    assert len(done_lines) == 1 and plan.jobs[9].signature in done_lines[0] and str(done) in done_lines[0]


# -- a real sweep --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_sweep_runs_where_the_plan_says_with_its_signatures(tiny_sweep):
    plan = expand(TINY_SWEEP)
    for job in plan.jobs:
        record = json.loads((tiny_sweep / job.subdir / "run.json").read_text())
        assert record["status"] == "completed"
        assert record["signature"] == job.signature


@pytest.mark.slow
def test_table_and_plot_of_the_tiny_sweep(tiny_sweep):
    result = run_cli(IBQ_SWEEP + ["table", str(tiny_sweep)])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("quantizer"))
    for column in ("codebook_size", "utilization", "perplexity", "PSNR", "SSIM"):
        assert column in header
    assert "rFID" not in header and "LPIPS" not in header  # no run has them: empty columns are dropped
    rows = [line.split()[:2] for line in lines if line.split()[:1] in (["ibq"], ["vq"])]
    assert rows == [["ibq", "256"], ["ibq", "1024"], ["vq", "256"], ["vq", "1024"]]

    result = run_cli(IBQ_SWEEP + ["plot", str(tiny_sweep), "--wandb", "disabled"])
    assert result.returncode == 0, result.stderr
    png = tiny_sweep / "plots" / "codebook_utilization_vs_codebook_size.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rfid: no run reports it; no plot" in result.stdout  # eval.rfid=false in this sweep
    assert "gfid" not in result.stdout and "\nloss:" not in result.stdout  # stage II's metrics: no note in a tokenizer sweep
