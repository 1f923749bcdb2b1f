"""Every quantizer trains through the main job (`ibq-train quantizer=<name>`) at tiny scale, and bad
quantizer settings stop it with one line on stderr."""

import json

import pytest
from conftest import IBQ_TRAIN, ONE_CROP_PER_PHOTO, run_cli

QUICK = ["train.steps=3", "train.log_every=1", "eval.rfid=false", "logger=none", ONE_CROP_PER_PHOTO]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, overrides",
    [
        ("ibq", []),
        ("ibq_chunked", ["quantizer=ibq", "quantizer.chunk_size=100"]),  # 100 does not divide 256
        ("vq", []),
        ("ema_vq", []),
        ("l2_vq", []),
        ("lfq", []),  # 256 = 2^8: 8 sign bits, projected from model.embed_dim
        ("fsq", []),  # default levels for 256: [8, 8, 4]
        ("simvq", []),
    ],
)
def test_training_runs_with_each_quantizer(tmp_path, name, overrides):
    run_dir = tmp_path / name
    selection = overrides or [f"quantizer={name}"]
    result = run_cli([*IBQ_TRAIN, *selection, "codebook_size=256", *QUICK, f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 < results["codebook/utilization"] <= 1
    assert results["codebook/dead"] < 256


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["quantizer=lfq", "codebook_size=1000"], "quantizer.codebook_size=1000 is invalid for lfq"),
        (["quantizer=fsq", "codebook_size=256", "quantizer.levels=[8,8,8]"], "quantizer.levels=[8, 8, 8] has 512 codes"),
        (["quantizer=ibq", "quantizer.chunk_size=0"], "quantizer.chunk_size=0 is invalid"),
        (["quantizer=ibq", "quantizer.entropy_temperature=0"], "quantizer.entropy_temperature=0 is invalid"),
    ],
)
def test_bad_quantizer_settings_exit_with_one_error_line(tmp_path, overrides, message):
    result = run_cli([*IBQ_TRAIN, *overrides, *QUICK, f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert message in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_code_dimension_that_does_not_match_the_encoder_stops_the_job(tmp_path):
    result = run_cli([*IBQ_TRAIN, "quantizer=lfq", "codebook_size=256", "quantizer.dim=8", *QUICK, f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and "quantizer.dim=8 does not match model.embed_dim=64" in errors[0], result.stderr[-3000:]
