"""ibq-eval: reproduces a run's own metrics, records them in the run, caches reference statistics, scores
samples in the ADM format, and rejects bad input with one line before writing anything."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO, cli_env, error_line, read_jsonl, run_cli, train, wandb_records
from ibq.cli import eval as eval_app
from ibq.config import build
from ibq.engine import train_tokenizer
from ibq.engine.evaluate import GenerationEvaluator, real_feature_stats
from ibq.engine.train_tokenizer import TokenizerTraining
from ibq.errors import UserError
from ibq.metrics.adm import AdmSamples, save_adm_npz, to_adm_array
from ibq.metrics import networks
from ibq.metrics.fid import FeatureStats, inception_score
from ibq.metrics.reference import ReferenceCache, ReferenceStats, load_reference_npz, reference_key

CONF = REPO / "conf"
IBQ_EVAL = [sys.executable, "-m", "ibq.cli.eval"]
REPRODUCED = ("rfid", "psnr", "ssim", "codebook/utilization", "codebook/perplexity")
PHOTOS = "[astronaut,coffee,rocket,camera]"  # 4 photos x 3 crops: enough samples for 4 IS splits, quick to score


class StandInNetwork:
    """A cheap FID network: fixed random projection of 4x4-pooled pixels; counts the images it has seen."""

    name = "stand-in"
    sha1 = "0" * 40

    def __init__(self, dim: int = 2048):
        self.projection = torch.randn(48, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.images = 0

    def features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        self.images += len(images_uint8)
        pooled = torch.nn.functional.adaptive_avg_pool2d(images_uint8.double(), 4).flatten(1)
        return pooled @ self.projection


class StandInInception(StandInNetwork):
    """Also gives 7-class logits, as torch-fidelity's Inception gives pool3 and logits in one pass."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.calls = 0

    def features_and_logits(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        features = self.features(images_uint8)
        return features, features[:, :7] / 100


def compose_eval(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=list(overrides), return_hydra_config=True)
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra/")}
    return cfg, choices


def evaluate_in_process(*overrides: str) -> list[str]:
    return eval_app.evaluate(*compose_eval(*overrides))


def run_files(run_dir: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}


def photo_samples() -> torch.Tensor:
    """The validation crops that `data=photos data.photos=PHOTOS data.val_crops_per_photo=3` gives at 32 px."""
    cfg, _ = compose_eval("data=photos", f"data.photos={PHOTOS}", "data.val_crops_per_photo=3", "data.resolution=32")
    val = build(cfg.data, seed=0).val
    return torch.stack([val[i][0] for i in range(len(val))])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = train(run_dir, "logger=wandb", "train.keep_every=2")  # offline: the evaluation must find and resume its W&B run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kept checkpoints      2 (train.keep_every): step0000002.pt … step0000004.pt" in result.stdout
    return run_dir


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run (without its W&B folder), so each test sees it untouched."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("wandb"))
    return copy


@pytest.fixture
def stand_in_fid(monkeypatch) -> StandInNetwork:
    network = StandInNetwork()
    monkeypatch.setattr(networks, "load_fid_network", lambda path=None, device="cpu": network)
    return network


# ------------------------------------------------------------------------------------------------ reconstruction


@pytest.mark.slow
def test_eval_reproduces_the_runs_own_metrics_and_records_them(run_copy: Path, tmp_path: Path):
    trained = json.loads((run_copy / "results.json").read_text())
    lines_before = read_jsonl(run_copy / "metrics.jsonl")
    cache = tmp_path / "cache"
    result = run_cli(IBQ_EVAL + [f"run_dir={run_copy}", f"reference.cache_dir={cache}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rfid" in result.stdout and "lpips/alex            unavailable" in result.stdout

    evaluated = json.loads((run_copy / "results.json").read_text())
    for key in REPRODUCED:
        assert evaluated[key] == pytest.approx(trained[key], rel=1e-6), key
    assert evaluated["codebook/dead"] == trained["codebook/dead"]
    assert evaluated["rfid/samples"] == 18 and evaluated["rfid/network"] == trained["rfid/network"]
    assert evaluated["eval/dataset"] == "photos" and evaluated["eval/split"] == "val"
    assert evaluated["eval/images"] == 18 and evaluated["eval/weights"] == "ema" and evaluated["eval/step"] == 4
    assert evaluated["lpips/vgg"] is None and "vgg16-397923af.pth" in evaluated["eval/unavailable"]["lpips_vgg"]
    assert evaluated["reconstruction_grid"] == trained["reconstruction_grid"]  # merged, not replaced

    lines = read_jsonl(run_copy / "metrics.jsonl")
    assert lines[:-1] == lines_before
    assert lines[-1]["step"] == 4 and lines[-1]["rfid"] == evaluated["rfid"] and lines[-1]["eval/weights"] == "ema"
    assert len(list(cache.glob("photos-val-*px-*.npz"))) == 1

    record = json.loads((run_copy / "run.json").read_text())
    train_id = record["wandb"]["id"]
    offline_runs = list((run_copy / "wandb").glob(f"offline-run-*-{train_id}-eval-4"))
    assert len(offline_runs) == 1, "the evaluation is its own W&B run, named after the training run and the step"
    tables = list(offline_runs[0].rglob("*.table.json"))
    assert tables and "rfid" in tables[0].read_text()
    run = next(r.run for r in wandb_records(run_copy, offline_runs[0].name) if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert run.job_type == "eval" and run.run_id == f"{train_id}-eval-4" and run.run_group == (record["wandb"]["group"] or "")
    assert config["train_run_id"] == train_id and config["git"] == {"commit": record["git"]["sha"], "dirty": record["git"]["dirty"]}
    assert config["choices"] == record["choices"] and config["evaluated_step"] == 4


@pytest.mark.slow
def test_reference_statistics_are_cached_across_evaluations(run_copy: Path, tmp_path: Path, stand_in_fid: StandInNetwork):
    cache = tmp_path / "cache"
    common = [f"run_dir={run_copy}", f"reference.cache_dir={cache}", "metrics.lpips=[]", "wandb_mode=disabled"]
    evaluate_in_process(*common)
    first = json.loads((run_copy / "results.json").read_text())
    assert first["eval/reference_cached"] is False and stand_in_fid.images == 2 * 18  # real and reconstructed
    (cached_file,) = cache.glob("*.npz")
    written = cached_file.stat().st_mtime_ns

    evaluate_in_process(*common, "weights=live")
    second = json.loads((run_copy / "results.json").read_text())
    assert second["eval/reference_cached"] is True and stand_in_fid.images == 3 * 18  # only the reconstructions
    assert cached_file.stat().st_mtime_ns == written and len(list(cache.glob("*.npz"))) == 1
    assert second["eval/weights"] == "live" and second["psnr"] != first["psnr"]


@pytest.mark.slow
def test_another_dataset_is_evaluated_at_the_training_resolution(run_copy: Path, tmp_path: Path):
    trained = json.loads((run_copy / "results.json").read_text())
    tokens_per_image = trained["codebook/tokens"] // trained["eval/images"]
    evaluate_in_process(f"run_dir={run_copy}", "metrics.fid=false", "metrics.lpips=[]", "wandb_mode=disabled",
                        "data=photos", f"data.photos={PHOTOS}", "data.val_crops_per_photo=3")
    results = json.loads((run_copy / "results.json").read_text())
    checkpoint = torch.load(run_copy / "checkpoints" / "last.pt", weights_only=True, mmap=True)
    assert results["eval/data"]["resolution"] == checkpoint["config"]["data"]["resolution"]
    assert results["eval/images"] == 12 and results["codebook/tokens"] == 12 * tokens_per_image


@pytest.mark.slow
def test_checkpoint_outside_a_run_writes_beside_it(run_copy: Path, tmp_path: Path):
    checkpoint = tmp_path / "elsewhere" / "tokenizer.pt"
    checkpoint.parent.mkdir()
    shutil.copy(run_copy / "checkpoints" / "last.pt", checkpoint)
    evaluate_in_process(f"checkpoint={checkpoint}", "metrics.fid=false", "metrics.lpips=[]")
    results = json.loads((tmp_path / "elsewhere" / "tokenizer.results.json").read_text())
    trained = json.loads((run_copy / "results.json").read_text())
    assert results["eval/step"] == 4 and results["psnr"] == pytest.approx(trained["psnr"], rel=1e-6)
    assert results["rfid"] is None and results["rfid/samples"] == 0


@pytest.mark.slow
def test_a_kept_checkpoint_is_evaluated_into_the_curve_and_results_json_keeps_the_final_figures(run_copy: Path):
    checkpoints = run_copy / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last.pt", "step0000002.pt", "step0000004.pt"]  # train.keep_every=2
    kept = torch.load(checkpoints / "step0000002.pt", weights_only=True, mmap=True)
    last = torch.load(checkpoints / "last.pt", weights_only=True, mmap=True)
    assert kept["step"] == 2 and not torch.equal(kept["ema"]["shadow.encoder.conv_in.weight"], last["ema"]["shadow.encoder.conv_in.weight"])
    final = (run_copy / "results.json").read_text()
    common = ["metrics.fid=false", "metrics.lpips=[]", "wandb_mode=disabled"]

    lines = evaluate_in_process(f"checkpoint={checkpoints / 'step0000002.pt'}", *common)
    assert (run_copy / "results.json").read_text() == final
    logged = read_jsonl(run_copy / "metrics.jsonl")[-1]
    assert logged["step"] == 2 and logged["eval/step"] == 2 and logged["psnr"] > 0
    assert lines[-1] == (f"  results               {run_copy / 'metrics.jsonl'} (at step 2; results.json keeps the figures of the run's "
                         f"end (step 4))")

    assert evaluate_in_process(f"run_dir={run_copy}", "step=2", *common) == lines  # the same checkpoint, named by its step
    assert read_jsonl(run_copy / "metrics.jsonl")[-1]["psnr"] == logged["psnr"]

    evaluate_in_process(f"checkpoint={checkpoints / 'step0000004.pt'}", *common)  # the last step's: the run's final figures
    assert json.loads((run_copy / "results.json").read_text())["eval/checkpoint"] == str(checkpoints / "step0000004.pt")


def bad_samples(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.npz"
    if kind == "float":
        np.savez(path, arr_0=np.zeros((4, 8, 8, 3), dtype=np.float32))
    elif kind == "nchw":
        np.savez(path, arr_0=np.zeros((4, 3, 8, 8), dtype=np.uint8))
    elif kind == "no_arr_0":
        np.savez(path, images=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    else:
        save_adm_npz(path, np.zeros((12, 8, 8, 3), dtype=np.uint8))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["run_dir={empty}"], "has no checkpoint (checkpoints/last.pt)"),
        (["run_dir={tmp}/missing"], "does not exist"),
        (["checkpoint={tmp}/not_a_checkpoint.pt"], "cannot be read"),
        (["run_dir={run}", "codebook_size=256"],
         "(checkpoint -> evaluated: quantizer.codebook_size: 1024 -> 256): tensor quantizer.codebook.weight is (1024, "),
        (["run_dir={run}", "model_scale=paper"], "does not fit the config it is evaluated with (checkpoint -> evaluated: model."),
        (["run_dir={run}", "quantizer=vq"], "it was trained with ibq.quantizers.IBQ, not ibq.quantizers.VQ"),
        (["run_dir={run}", "data=photos", "data.resolution=16"], "data.resolution=16 differs from the checkpoint's training resolution"),
        (["run_dir={run}", "metrics.lpips=[alex]", "metrics.required=[fid,lpips_alex]",
          "metrics.lpips_backbone_paths.alex={tmp}/alex.pth"], "alex.pth (place torchvision's alexnet-owt-7be5be79.pth there"),
        (["run_dir={run}", "metrics.fid_network_path={tmp}/missing.pt"], "missing.pt not found"),
        (["run_dir={run}", "weights=best"], "weights='best' is invalid; valid: ema, live"),
        (["run_dir={run}", "step=3"], "step=3: {run} has no checkpoint of that step; it kept steps 2, 4, and last.pt is step 4"),
        (["checkpoint={run}/checkpoints/last.pt", "step=2"], "step=2 picks a checkpoint of run_dir=<run> to evaluate: give it with run_dir="),
        (["samples={tmp}/float.npz"], "arr_0 has dtype float32, expected uint8"),
        (["samples={tmp}/nchw.npz"], "arr_0 has shape (4, 3, 8, 8), expected N x H x W x 3"),
        (["samples={tmp}/no_arr_0.npz"], "has no arr_0"),
        (["samples={tmp}/ok.npz", "metrics.required=[fid,is]"], "set metrics.inception_weights_path"),
        (["samples={tmp}/ok.npz", "metrics.is=false"], "gFID needs reference statistics"),
        (["samples={tmp}/ok.npz", "metrics.is=false", "reference.stats={tmp}/float.npz"], "expected mu and sigma"),
        ([], "nothing to evaluate"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(run_copy: Path, tmp_path: Path, overrides: list[str], expected: str):
    (tmp_path / "empty").mkdir()
    (tmp_path / "not_a_checkpoint.pt").write_bytes(b"not a checkpoint")
    for kind in ("float", "nchw", "no_arr_0", "ok"):
        bad_samples(tmp_path, kind)
    cache = tmp_path / "cache"
    args = [arg.format(run=run_copy, tmp=tmp_path, empty=tmp_path / "empty") for arg in overrides]
    before = run_files(run_copy)
    with pytest.raises((UserError, FileNotFoundError)) as raised:
        evaluate_in_process(f"reference.cache_dir={cache}", "metrics.lpips=[]", *args)
    message = str(raised.value)
    assert expected.format(run=run_copy) in message and "\n" not in message
    assert run_files(run_copy) == before and not cache.exists()
    assert not list(tmp_path.glob("*.results.json"))


@pytest.mark.slow
def test_cli_prints_one_line_and_exits_nonzero(run_copy: Path, tmp_path: Path):
    before = run_files(run_copy)
    cache = tmp_path / "cache"
    line = error_line(run_cli(IBQ_EVAL + [f"run_dir={run_copy}", "codebook_size=256", f"reference.cache_dir={cache}"]))
    assert "quantizer.codebook_size: 1024 -> 256" in line
    assert run_files(run_copy) == before and not cache.exists()


@pytest.mark.slow
def test_a_sweep_goes_on_past_a_failed_evaluation_and_the_working_directory_stays(run_copy: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    quick = ["metrics.fid=false", "metrics.lpips=[]"]
    # A checkpoint that does not fit the size asked for is found when the job loads it, not before.
    result = run_cli(IBQ_EVAL + ["-m", f"run_dir={run_copy}", "codebook_size=256,1024", "weights=live", *quick, f"hydra.sweep.dir={sweep}"])
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"sweep {sweep}: 1 of 2 jobs done, 1 failed" in result.stdout
    assert "job 1/2 (" in result.stdout and "): failed: checkpoint " in result.stdout and "quantizer.codebook_size: 1024 -> 256" in result.stdout
    assert json.loads((run_copy / "results.json").read_text())["eval/weights"] == "live"
    assert sorted(path.name for path in sweep.iterdir()) == [".jobs", "multirun.yaml"]  # no empty job folders
    # What the config alone shows is refused for every job before the first runs.
    refused = run_cli(IBQ_EVAL + ["-m", f"run_dir={run_copy}", "weights=ema,both", *quick, f"hydra.sweep.dir={tmp_path / 'refused'}"])
    assert refused.returncode == 2 and refused.stderr.strip() == "error: weights='both' is invalid; valid: ema, live"
    assert not (tmp_path / "refused").exists()

    elsewhere = tmp_path / "elsewhere"  # ibq-eval's run folder is the working directory, which it leaves in place
    elsewhere.mkdir()
    result = subprocess.run(IBQ_EVAL + [f"run_dir={run_copy}", "weights=ema", *quick], cwd=elsewhere, capture_output=True,
                            text=True, timeout=600, env=cli_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert elsewhere.is_dir() and json.loads((run_copy / "results.json").read_text())["eval/weights"] == "ema"


# ---------------------------------------------------------------------------------------------------- generation


def stand_in_torch_fidelity_weights(path: Path, monkeypatch) -> Path:
    """Randomly initialised torch-fidelity Inception weights: its real loading path, without the real file."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with monkeypatch.context() as patch:
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        stand_in = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    torch.save(stand_in.state_dict(), path)
    return path


@pytest.mark.slow
def test_generation_scores_adm_samples_against_a_real_set(tmp_path: Path, monkeypatch):
    samples = save_adm_npz(tmp_path / "samples.npz", to_adm_array(photo_samples()))
    weights = stand_in_torch_fidelity_weights(tmp_path / "inception.pth", monkeypatch)
    cache = tmp_path / "cache"
    # torch-fidelity's Inception for both metrics: one forward pass per batch (the shipped FID network is
    # exercised end to end by the reconstruction test)
    args = [f"samples={samples}", "data=photos", f"data.photos={PHOTOS}", "data.val_crops_per_photo=3",
            f"reference.cache_dir={cache}", f"metrics.inception_weights_path={weights}", "metrics.is_splits=4",
            "metrics.fid_network=torch-fidelity"]
    result = run_cli(IBQ_EVAL + args)
    assert result.returncode == 0, result.stderr[-3000:]

    results = json.loads((tmp_path / "samples.results.json").read_text())
    assert abs(results["gfid"]) < 1e-3, "samples identical to the reference set"
    assert results["gfid/samples"] == 12 and results["gfid/reference_samples"] == 12
    assert "torch-fidelity" in results["gfid/network"] and "photos val" in results["gfid/reference"]
    assert results["is"] >= 1.0 and results["is/splits"] == 4 and results["is/shuffle"] is True
    assert results["is/samples"] == 12 and "torch-fidelity" in results["is/network"]
    assert results["eval/reference_cached"] is False and len(list(cache.glob("photos-val-32px-*.npz"))) == 1


def test_generation_evaluator_shares_one_pass_and_follows_the_split_order():
    images = to_adm_array(photo_samples())
    batches = [torch.from_numpy(images[i : i + 5]).permute(0, 3, 1, 2) for i in range(0, len(images), 5)]
    inception = StandInInception(dim=16)
    reference_stats = FeatureStats(dim=16)
    reference_stats.update(StandInNetwork(dim=16).features(torch.cat(batches)))
    reference = ReferenceStats.from_feature_stats(reference_stats, "the samples themselves")
    logits = inception.features_and_logits(torch.cat(batches))[1]
    inception.calls = 0

    for shuffle in (True, False):
        evaluator = GenerationEvaluator(torch.device("cpu"), inception, inception, is_splits=4, is_shuffle=shuffle)
        with pytest.warns(RuntimeWarning, match="biased"):
            metrics = evaluator(batches, reference)
        assert (metrics["is"], metrics["is/std"]) == pytest.approx(inception_score(logits, splits=4, shuffle=shuffle))
        assert abs(metrics["gfid"]) < 1e-9 * np.trace(reference.sigma) and metrics["gfid/samples"] == 12
        assert metrics["is/shuffle"] is shuffle
    assert inception.calls == 2 * len(batches), "FID and IS come from one forward pass per batch"


# ---------------------------------------------------------------------------------------------------- ADM files


def test_adm_npz_round_trip_is_what_numpy_and_the_adm_evaluator_read(tmp_path: Path):
    images = torch.rand(7, 3, 6, 5) * 2 - 1
    array = to_adm_array(images)
    assert array.shape == (7, 6, 5, 3) and array.dtype == np.uint8
    path = save_adm_npz(tmp_path / "out" / "samples.npz", array)
    with np.load(path) as data:
        assert data.files == ["arr_0"]
        np.testing.assert_array_equal(data["arr_0"], array)
    samples = AdmSamples(path)
    assert len(samples) == 7 and samples.resolution == (6, 5)
    streamed = torch.cat(list(samples.batches(3)))
    torch.testing.assert_close(streamed, torch.from_numpy(array).permute(0, 3, 1, 2))
    assert [p.name for p in path.parent.iterdir()] == ["samples.npz"]

    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, arr_0=array)
    torch.testing.assert_close(torch.cat(list(AdmSamples(compressed).batches(4))), streamed)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("float", "dtype float32, expected uint8"),
        ("nchw", "shape (4, 3, 8, 8), expected N x H x W x 3"),
        ("no_arr_0", "has no arr_0"),
    ],
)
def test_adm_npz_validation(tmp_path: Path, kind: str, expected: str):
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        AdmSamples(bad_samples(tmp_path, kind))


def test_adm_npz_rejects_other_files_and_arrays(tmp_path: Path):
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(UserError, match="is not a .npz"):
        AdmSamples(tmp_path / "text.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz not found"):
        AdmSamples(tmp_path / "missing.npz")
    np.savez(tmp_path / "fortran.npz", arr_0=np.asfortranarray(np.zeros((2, 4, 4, 3), dtype=np.uint8)))
    with pytest.raises(UserError, match="Fortran order"):
        AdmSamples(tmp_path / "fortran.npz")
    with pytest.raises(UserError, match="dtype float64"):
        save_adm_npz(tmp_path / "bad.npz", np.zeros((2, 4, 4, 3)))
    with pytest.raises(UserError, match=r"shape \(4, 4, 3\)"):
        save_adm_npz(tmp_path / "bad.npz", np.zeros((4, 4, 3), dtype=np.uint8))
    assert not (tmp_path / "bad.npz").exists()


def sample_part(folder: Path, part: int, parts: int, images: np.ndarray, **identity) -> Path:
    """A part as ibq-sample leaves it: samples.npz beside its results.json."""
    record = {"run_signature": "abc", "step": 7, "sampling": {"cfg_scale": 2.0}, "seed": 0, "batch_size": 4, "classes": [0, 1],
              "samples_per_class": 3, "parts": parts, "part": part, **identity}
    (folder / f"part={part}").mkdir(parents=True)
    (folder / f"part={part}" / "results.json").write_text(json.dumps(record))
    return save_adm_npz(folder / f"part={part}" / "samples.npz", images)


def test_the_parts_of_a_split_sampling_are_read_as_one_set_in_part_order(tmp_path: Path):
    from ibq.engine.evaluation_run import open_samples

    images = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    for part in (2, 0, 1):  # written in any order
        sample_part(tmp_path / "sweep", part, 3, images[2 * part : 2 * part + 2])
    samples = open_samples(tmp_path / "sweep")
    assert len(samples) == 6 and samples.resolution == (4, 4) and samples.batch_count(3) == 3
    torch.testing.assert_close(torch.cat(list(samples.batches(3))), torch.from_numpy(images).permute(0, 3, 1, 2))


@pytest.mark.parametrize(("layout", "expected"), [
    ("missing", "lacks part 1 of parts=3: run ibq-sample with part=1 and the same settings"),
    ("other_seed", "holds samples of 2 different samplings (runs, settings or parts)"),
    ("twice", "holds part 0 twice"),
    ("bare_file", "has no results.json beside it"),
    ("empty", "holds no samples.npz"),
])
def test_an_incomplete_or_mixed_set_of_parts_is_refused(tmp_path: Path, layout: str, expected: str):
    from ibq.engine.evaluation_run import open_samples

    images, folder = np.zeros((2, 4, 4, 3), dtype=np.uint8), tmp_path / "sweep"
    folder.mkdir()
    if layout in ("missing", "other_seed"):
        sample_part(folder, 0, 3, images)
        sample_part(folder, 2, 3, images, **({"seed": 1} if layout == "other_seed" else {}))
    elif layout == "twice":
        sample_part(folder / "a", 0, 1, images)
        sample_part(folder / "b", 0, 1, images)
    elif layout == "bare_file":
        save_adm_npz(folder / "x" / "samples.npz", images)
    with pytest.raises(UserError, match=re.escape(expected)):
        open_samples(folder)


# ----------------------------------------------------------------------------------------- reference statistics


def test_reference_cache_computes_once_per_key(tmp_path: Path):
    calls = []

    def compute() -> FeatureStats:
        calls.append(1)
        stats = FeatureStats(dim=4)
        stats.update(torch.arange(12.0).reshape(3, 4) ** 2)
        return stats

    data = {"_target_": "ibq.data.build_photos", "resolution": 64, "num_workers": 0}
    key = reference_key(data, "val", None, 0, "a" * 40)
    cache = ReferenceCache(tmp_path / "cache")
    stats, cached = cache.get_or_compute(key, compute)
    assert not cached and len(calls) == 1
    path = cache.path(key)
    written = path.stat().st_mtime_ns
    again, cached = cache.get_or_compute(key, compute)
    assert cached and len(calls) == 1 and path.stat().st_mtime_ns == written
    torch.testing.assert_close(again.covariance(), stats.covariance())

    # Anything that changes the statistics is part of the key; loader settings are not.
    assert reference_key({**data, "num_workers": 8}, "val", None, 0, "a" * 40) == key
    for other in (
        reference_key({**data, "resolution": 32}, "val", None, 0, "a" * 40),
        reference_key(data, "train", None, 0, "a" * 40),
        reference_key(data, "val", 100, 0, "a" * 40),
        reference_key(data, "val", None, 0, "b" * 40),
    ):
        assert other.digest() != key.digest()
        assert cache.get_or_compute(other, compute)[1] is False
    assert len(calls) == 5
    ReferenceCache(tmp_path / "cache", refresh=True).get_or_compute(key, compute)
    assert len(calls) == 6 and not list((tmp_path / "cache").glob(".*tmp"))


def test_training_runs_share_the_real_images_statistics_with_each_other_and_ibq_eval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    network = StandInNetwork()
    monkeypatch.setattr(train_tokenizer, "load_fid_network", lambda device="cpu": network)
    monkeypatch.setattr(networks, "load_fid_network", lambda path=None, device="cpu": network)
    cache = tmp_path / "fid_stats"
    images = 12  # 4 photos x 3 validation crops

    def train_in_process(name: str, *overrides: str) -> dict:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=["logger=none", "train.steps=1", "train.device=cpu", f"data.photos={PHOTOS}",
                                              "data.val_crops_per_photo=3", f"eval.reference_cache_dir={cache}", *overrides])
        return TokenizerTraining(cfg, tmp_path / name).run({}, [], None)

    first = train_in_process("first")
    assert network.images == 2 * images  # the real crops and their reconstructions
    (cached_file,) = cache.glob("photos-val-32px-*.npz")
    val = build(compose_eval("data=photos", f"data.photos={PHOTOS}", "data.val_crops_per_photo=3", "data.resolution=32")[0].data,
                seed=0).val
    direct = real_feature_stats(torch.utils.data.DataLoader(val, batch_size=32), StandInNetwork(), torch.device("cpu"))
    stored = FeatureStats.from_npz(cached_file)
    assert stored.count == images
    torch.testing.assert_close(stored.covariance(), direct.covariance(), rtol=0, atol=0)

    # Another tokenizer on the same validation images reads them; its rFID is against the same statistics.
    with caplog.at_level(logging.INFO, logger="ibq.engine.evaluate"):
        second = train_in_process("second", "codebook_size=256")
    assert network.images == 3 * images and f"statistics from {cached_file}" in caplog.text
    fresh = train_in_process("fresh", "codebook_size=256", "eval.reference_cache_dir=null")
    assert network.images == 5 * images and len(list(cache.iterdir())) == 1
    assert second["psnr"] == pytest.approx(fresh["psnr"]) and second["rfid"] == pytest.approx(fresh["rfid"], rel=1e-9)
    assert first["rfid"] != second["rfid"]

    evaluate_in_process(f"run_dir={tmp_path / 'second'}", f"reference.cache_dir={cache}", "metrics.lpips=[]", "wandb_mode=disabled")
    assert json.loads((tmp_path / "second" / "results.json").read_text())["eval/reference_cached"] is True
    assert network.images == 6 * images

    # A cache that cannot be written costs time, not the result.
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING, logger="ibq.engine.evaluate"):
        unwritable = train_in_process("unwritable", f"eval.reference_cache_dir={blocked}")
    assert unwritable["rfid"] == pytest.approx(first["rfid"], rel=1e-6) and "could not be cached" in caplog.text


def test_reference_npz_with_mu_and_sigma_or_feature_stats(tmp_path: Path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=8), np.eye(8)
    np.savez(tmp_path / "adm.npz", mu=mu.astype(np.float32), sigma=sigma, mu_s=np.zeros(3))
    reference = load_reference_npz(tmp_path / "adm.npz", dim=8)
    assert reference.count is None and reference.mu.dtype == np.float64
    np.testing.assert_allclose(reference.mu, mu.astype(np.float32))

    stats = FeatureStats(dim=8)
    stats.update(torch.from_numpy(rng.normal(size=(20, 8))))
    stats.to_npz(tmp_path / "stats.npz")
    reference = load_reference_npz(tmp_path / "stats.npz", dim=8)
    assert reference.count == 20
    np.testing.assert_allclose(reference.sigma, stats.covariance().numpy())

    with pytest.raises(UserError, match=r"expected \(2048,\) and \(2048, 2048\)"):
        load_reference_npz(tmp_path / "adm.npz", dim=2048)
    with pytest.raises(FileNotFoundError, match="missing.npz not found"):
        load_reference_npz(tmp_path / "missing.npz", dim=8)


def test_a_missing_lpips_package_is_unavailable_like_a_missing_backbone(monkeypatch, caplog):
    from ibq.metrics.lpips import try_load_lpips

    monkeypatch.setitem(sys.modules, "lpips", None)  # what `import lpips` meets when the package is absent
    with caplog.at_level(logging.WARNING):
        assert try_load_lpips("vgg", None, required=False) is None
    assert "the lpips package cannot be imported" in caplog.text and "LPIPS is recorded as unavailable" in caplog.text
    with pytest.raises(FileNotFoundError, match="pip install lpips"):
        try_load_lpips("vgg", None, required=True)


def test_one_sampling_is_scored_against_the_same_real_images_by_ibq_sample_and_ibq_eval(tmp_path: Path):
    """ibq-eval samples=… run_dir=… (the parts of a split sampling, or a sampling scored again) takes the real
    images ibq-sample scored against, so both give one gFID and share the cached statistics."""
    from omegaconf import OmegaConf

    from ibq.cli.sample import eval_config
    from ibq.engine.evaluation_run import reference_selection

    run = tmp_path / "ar"  # the run's scale sets the count (test_stage2)
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"choices": {"model_scale": "tiny"}}))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        evaluation = compose("eval", overrides=[f"samples={tmp_path / 's.npz'}", f"run_dir={run}"])
        sampling = compose("sample", overrides=[f"run_dir={run}"])
        sampling_all = compose("sample", overrides=[f"run_dir={run}", "reference.limit=null"])
    by_sample = eval_config(sampling, run, tmp_path / "s.npz").reference
    assert reference_selection(by_sample, own_data=True, run_dir=run) == ("train", 2048)
    assert reference_selection(evaluation.reference, own_data=True, run_dir=run) == ("train", 2048)
    # data=<an evaluation set>, which may have no train split: all of its val images, as before.
    assert reference_selection(evaluation.reference, own_data=False, run_dir=run) == ("val", None)
    assert reference_selection(OmegaConf.create({"split": "val", "limit": 16}), own_data=True, run_dir=run) == ("val", 16)
    by_sample_all = eval_config(sampling_all, run, tmp_path / "s.npz").reference
    assert reference_selection(by_sample_all, own_data=True, run_dir=run) == ("train", None)


def test_samples_of_an_earlier_checkpoint_are_scored_into_the_curve_and_results_json_keeps_the_runs_end(tmp_path: Path,
                                                                                                         stand_in_fid: StandInNetwork):
    """ibq-eval of an ibq-sample sampling of a kept AR checkpoint (ibq-sample step=N): at the step that drew it."""
    from ibq.engine.checkpoint import save_checkpoint

    run = tmp_path / "ar"
    save_checkpoint(run / "checkpoints" / "last.pt", {"step": 300})
    (run / "run.json").write_text(json.dumps({"status": "completed", "total_steps": 300}))
    (run / "results.json").write_text(json.dumps({"step": 300, "gfid": 12.5}))
    np.savez(tmp_path / "reference.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    common = [f"run_dir={run}", f"reference.stats={tmp_path / 'reference.npz'}", "metrics.is=false", "wandb_mode=disabled"]

    def sampling(step: int) -> Path:
        folder = tmp_path / f"step_{step}"
        folder.mkdir(exist_ok=True)
        save_adm_npz(folder / "samples.npz", to_adm_array(photo_samples()))
        sampling = {"cfg_scale": 2.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
        (folder / "results.json").write_text(json.dumps({"step": step, "sampling": sampling, "seed": 0, "npz": str(folder / "samples.npz")}))
        return folder / "samples.npz"

    lines = evaluate_in_process(f"samples={sampling(100)}", *common)
    assert json.loads((run / "results.json").read_text()) == {"step": 300, "gfid": 12.5}
    logged = read_jsonl(run / "metrics.jsonl")[-1]
    assert logged["step"] == 100 and logged["gfid"] > 0 and logged["eval/samples"] == 12
    assert lines[-1] == (f"  results               {run / 'metrics.jsonl'} (at step 100; results.json keeps the figures of the run's "
                         f"end (step 300))")

    # The run while it still trains (to step 500): its last checkpoint so far is not its end.
    (run / "run.json").write_text(json.dumps({"status": "running", "total_steps": 500}))
    lines = evaluate_in_process(f"samples={sampling(300)}", *common)
    assert json.loads((run / "results.json").read_text()) == {"step": 300, "gfid": 12.5}
    assert lines[-1].endswith("(at step 300; results.json keeps the figures of the run's end (step 500))")

    (run / "run.json").write_text(json.dumps({"status": "completed", "total_steps": 300}))
    lines = evaluate_in_process(f"samples={sampling(300)}", *common)  # the completed run's last checkpoint: its final figures
    assert json.loads((run / "results.json").read_text())["gfid"] == logged["gfid"]
    assert read_jsonl(run / "metrics.jsonl")[-1]["step"] == 300 and lines[-1] == f"  results               {run / 'results.json'}"
