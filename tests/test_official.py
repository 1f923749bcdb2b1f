"""The released IBQ checkpoints: import against the official code's outputs (tests/fixtures/official, tiny
models of the official modules with their inputs and outputs), export back byte for byte, one-line errors
with nothing written, and the key mapping of every released size on the meta device."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import BackgroundRun, error_line, run_cli, train_args
from ibq.cli.import_official import composed, main as ibq_import
from ibq.data.pack import sha256
from ibq.engine import official
from ibq.engine.tokens import load_tokenizer_run
from ibq.engine.train_ar import load_ar_run

FIXTURES = Path(__file__).parent / "fixtures" / "official"
TOKENIZER, TOKENIZER_CONFIG = FIXTURES / "tokenizer_tiny.ckpt", FIXTURES / "tokenizer_tiny_config.json"
AR, AR_CONFIG = FIXTURES / "ar_tiny.ckpt", FIXTURES / "ar_tiny_config.json"
IBQ_IMPORT = ["-m", "ibq.cli.import_official"]
TOLERANCE = 1e-4  # the fixture README's: ~1e-6 observed on CPU fp32


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < TOLERANCE


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """The fixtures imported once: tokenizer (EMA and raw weights) and AR model, with their official configs."""
    root = tmp_path_factory.mktemp("imported")
    ibq_import([str(TOKENIZER), "--config", str(TOKENIZER_CONFIG), "-o", str(root / "ema"), "logger=none"])
    ibq_import([str(TOKENIZER), "--config", str(TOKENIZER_CONFIG), "--weights", "raw", "-o", str(root / "raw"), "logger=none"])
    ibq_import([str(AR), "--config", str(AR_CONFIG), "-o", str(root / "ar"), "logger=none"])
    return root


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_imported_tokenizer_reproduces_the_official_outputs(imported: Path, weights: str):
    io = load(FIXTURES / "tokenizer_tiny_io.pt")
    expected = io[weights]
    tokenizer = load_tokenizer_run(imported / weights, torch.device("cpu")).tokenizer
    with torch.no_grad():
        h = tokenizer.encoder(io["images"])
        quantized = tokenizer.quantizer(tokenizer.quant_conv(h))
        close(h, expected["h"])
        close(tokenizer.quant_conv(h), expected["h_quant_conv"])
        assert torch.equal(quantized.indices, expected["indices"])
        close(quantized.z_q, expected["z_q"])
        close(tokenizer.decode(quantized.z_q), expected["reconstruction"])
        close(tokenizer.decode_indices(expected["indices"]), expected["reconstruction_from_indices"])
    record = json.loads((imported / weights / "run.json").read_text())
    assert record["status"] == "completed" and record["kind"] == "tokenizer"
    assert record["imported"]["weights"] == weights
    assert record["imported"]["sha256"] == sha256(TOKENIZER)
    assert record["choices"]["model_scale"] == "tiny" and record["choices"]["quantizer"] == "ibq"


def test_imported_runs_have_their_own_signatures(imported: Path):
    signatures = {json.loads((imported / run / "run.json").read_text())["signature"] for run in ("ema", "raw", "ar/tokenizer", "ar/ar")}
    assert len(signatures) == 4


def test_imported_ar_model_reproduces_the_official_logits_and_sampling_steps(imported: Path, monkeypatch):
    io = load(FIXTURES / "ar_tiny_io.pt")
    run = load_ar_run(imported / "ar" / "ar", torch.device("cpu"))
    model, labels, forced = run.model, io["labels"], io["forced_tokens"]
    assert dict(run.config.sampling) == {"cfg_scale": 2.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    with torch.no_grad():
        close(model(io["tokens"], labels), io["teacher_forced_logits"])
        close(model(io["tokens"], torch.full_like(labels, model.null_class)), io["teacher_forced_logits_null_class"])
        # KV-cached steps of both halves, as sample_IBQ runs them
        both = torch.cat([labels, torch.full_like(labels, model.null_class)])
        model.setup_cache(len(both))
        for step in range(forced.shape[1]):
            logits = model.prefill(both) if step == 0 else model.step(forced[:, step - 1].repeat(2), step - 1)
            cond, uncond = logits.chunk(2)
            close(cond, io["step_logits_cond"][step])
            close(uncond, io["step_logits_uncond"][step])
            close(uncond + io["cfg_scale"] * (cond - uncond), io["step_logits_guided"][step])
        model.reset_cache()

    # The platform's sampler with the draw replaced by the official run's tokens: the same probabilities.
    from ibq.generation import sampling

    handed = []

    def forced_draw(probs, num_samples, generator=None):
        handed.append(probs.clone())
        return forced[:, len(handed) - 1 : len(handed)]

    monkeypatch.setattr(sampling.torch, "multinomial", forced_draw)
    tokens = sampling.sample(model, labels, num_tokens=forced.shape[1], **run.config.sampling)
    assert torch.equal(tokens, io["sampled_tokens"])
    for step, probs in enumerate(handed):
        close(probs, io["step_probs"][step])
    with torch.no_grad():
        decoded = run.tokenizer_run.tokenizer.decode_indices(io["tokens"].view(-1, 4, 4))
    close(decoded, io["tokens_decoded"])


@pytest.mark.parametrize("run, fixture", [("ema", TOKENIZER), ("ar/ar", AR)])
def test_export_gives_back_the_official_file(imported: Path, tmp_path: Path, run: str, fixture: Path):
    ibq_import(["--export", str(imported / run), "-o", str(tmp_path / "out.ckpt")])
    exported, original = load(tmp_path / "out.ckpt"), load(fixture)
    assert list(exported) == ["state_dict"]
    assert list(exported["state_dict"]) == list(original["state_dict"])
    for key, tensor in original["state_dict"].items():
        mine = exported["state_dict"][key]
        assert mine.dtype == tensor.dtype and mine.shape == tensor.shape and torch.equal(mine, tensor), key


def test_a_run_trained_here_exports_and_imports_back(tmp_path: Path):
    """The tiny preset (channels changing between levels, attention at level 2) through the official layout."""
    from ibq.config import build
    from ibq.engine.checkpoint import save_checkpoint
    from ibq.engine.ema import EMA
    from ibq.runs.record import STAGE_II_KEYS, result_config, without_keys

    cfg = without_keys(composed(["logger=none"], "train").cfg, STAGE_II_KEYS)
    tokenizer = build(cfg.model, quantizer=build(cfg.quantizer))
    ema = EMA(tokenizer)
    for parameter in ema.shadow.parameters():
        parameter.data.normal_()
    save_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt",
                    {"step": 7, "signature": "s", "config": result_config(cfg), "tokenizer": tokenizer.state_dict(), "ema": ema.state_dict()})
    ibq_import(["--export", str(tmp_path / "run"), "-o", str(tmp_path / "official.ckpt")])
    exported = load(tmp_path / "official.ckpt")["state_dict"]
    assert exported["model_ema.num_updates"].item() == 7 and "encoder.down.1.block.0.nin_shortcut.weight" in exported

    ibq_import([str(tmp_path / "official.ckpt"), "-o", str(tmp_path / "back"), "logger=none"])
    back = load_tokenizer_run(tmp_path / "back", torch.device("cpu")).tokenizer.state_dict()
    assert back.keys() == ema.shadow.state_dict().keys()
    assert all(torch.equal(back[key], value) for key, value in ema.shadow.state_dict().items())


def test_architecture_from_shapes_equals_the_official_config():
    file = official.read_official(TOKENIZER)
    from_config = official.tokenizer_arch(file, "", official.read_official_config(TOKENIZER_CONFIG), TOKENIZER_CONFIG)
    from_shapes = official.tokenizer_arch(file, "", None, None)
    assert from_shapes.resolution is None and from_config.resolution == 8
    assert from_shapes == official.TokenizerArch(**{**from_config.__dict__, "resolution": None})
    assert list(from_config.tensors()) == [key for key in file.state if not key.startswith("model_ema.")]


def refused(tmp_path: Path, capsys, *args: str) -> str:
    """Runs ibq-import, which must fail with one line and leave nothing in tmp_path/out's folder."""
    with pytest.raises(SystemExit) as stopped:
        ibq_import([*args, "-o", str(tmp_path / "out" / "run")])
    assert stopped.value.code != 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    return lines[0]


def test_bad_files_are_refused_in_one_line_and_nothing_is_written(tmp_path: Path, capsys):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    assert refused(tmp_path, capsys, str(text)) == (f"error: {text} cannot be read as a checkpoint (truncated, or not a torch file?): "
                                                   "it is not what torch.save writes (a torn file, or another kind)")

    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(TOKENIZER.read_bytes()[: TOKENIZER.stat().st_size // 2])
    assert refused(tmp_path, capsys, str(torn)) == (f"error: {torn} cannot be read as a checkpoint (truncated, or not a torch file?): "
                                                   "PytorchStreamReader failed reading zip archive: failed finding central directory")

    state = load(TOKENIZER)["state_dict"]
    other = dict(state)
    del other["decoder.conv_out.bias"]
    other["decoder.extra.weight"] = torch.zeros(1)
    other["quant_conv.weight"] = torch.zeros(16, 32, 1, 1)
    torch.save({"state_dict": other}, tmp_path / "other.ckpt")
    line = refused(tmp_path, capsys, str(tmp_path / "other.ckpt"), "--config", str(TOKENIZER_CONFIG))
    assert "missing 1 tensor(s), e.g. decoder.conv_out.bias (3)" in line
    assert "unexpected 1, e.g. decoder.extra.weight" in line
    assert "quant_conv.weight is (16, 32, 1, 1) but (32, 32, 1, 1) was expected" in line

    torch.save({"model": state}, tmp_path / "no_state_dict.ckpt")
    assert "has no 'state_dict'" in refused(tmp_path, capsys, str(tmp_path / "no_state_dict.ckpt"))


def test_a_codebook_size_that_disagrees_with_the_config_is_refused(tmp_path: Path, capsys):
    config = json.loads(TOKENIZER_CONFIG.read_text())
    config["model"]["init_args"]["n_embed"] = 128
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    line = refused(tmp_path, capsys, str(TOKENIZER), "--config", str(tmp_path / "config.yaml"))
    assert "K=64" in line and "n_embed=128" in line


def test_an_ar_file_of_unknown_scale_needs_its_config(tmp_path: Path, capsys):
    assert "give its official config with --config" in refused(tmp_path, capsys, str(AR))


def test_an_existing_output_is_refused(imported: Path, capsys):
    with pytest.raises(SystemExit):
        ibq_import([str(TOKENIZER), "-o", str(imported / "ema")])
    assert "already exists" in capsys.readouterr().err


# -- the released sizes, on the meta device ----------------------------------------------------------------

RELEASED_DDCONFIG = {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                     "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 4, "attn_resolutions": [16], "dropout": 0.0}
GENERATOR_PARAMETERS = {1024: 107_049_859, 8192: 108_884_867, 16384: 110_982_019, 262144: 173_896_579}
AR_PARAMETERS = {"B": (16, 16, 1024, 342_994_944), "L": (20, 20, 1280, 649_640_960),
                 "XL": (24, 24, 1536, 1_076_103_168), "XXL": (30, 30, 1920, 2_063_331_840)}


@pytest.mark.parametrize("codebook_size", sorted(GENERATOR_PARAMETERS))
def test_released_tokenizers_map_every_key_with_equal_shapes(codebook_size: int):
    arch = official.TokenizerArch.from_ddconfig(RELEASED_DDCONFIG, codebook_size, 256, "released")
    tensors = arch.tensors()
    assert sum(torch.Size(shape).numel() for _, shape in tensors.values()) == GENERATOR_PARAMETERS[codebook_size]
    assert {"encoder.down.2.block.0.nin_shortcut.weight", "encoder.down.4.block.0.nin_shortcut.weight",
            "decoder.up.3.block.0.nin_shortcut.weight", "decoder.up.1.block.0.nin_shortcut.weight"} <= set(tensors)
    cfg = composed(arch.overrides(), "train").cfg
    assert arch.overrides()[0] == "model_scale=paper"
    official.check_model_matches(cfg.model, cfg.quantizer, tensors, "released")


@pytest.mark.parametrize("scale", sorted(AR_PARAMETERS))
def test_released_ar_models_map_every_key_with_equal_shapes(scale: str):
    depth, heads, width, parameters = AR_PARAMETERS[scale]
    params = {"vocab_size": 16384, "block_size": 256, "n_layer": depth, "n_head": heads, "n_embd": width, "cond_dim": width, "class_num": 1000}
    arch = official.ARArch.from_params(params, "released")
    assert arch.overrides(256) == [f"model_scale={scale}"]
    tensors = arch.tensors()
    assert sum(torch.Size(shape).numel() for _, shape in tensors.values()) == parameters
    cfg = composed(arch.overrides(256), "train_ar").cfg
    official.check_model_matches(cfg.transformer, None, tensors, "released")
    sampling = {"B": (2.25, 1.1), "L": (2.0, 1.0), "XL": (2.35, 1.15), "XXL": (2.85, 1.2)}[scale]
    assert (cfg.sampling.cfg_scale, cfg.sampling.temperature) == sampling


# -- through every app ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_imported_run_goes_through_every_app(tmp_path: Path):
    python = [sys.executable]
    result = run_cli(python + IBQ_IMPORT + [str(AR), "--config", str(AR_CONFIG), "-o", str(tmp_path / "ar"), "logger=none"])
    assert result.returncode == 0, result.stderr[-2000:]
    tokenizer_run, ar_run = tmp_path / "ar" / "tokenizer", tmp_path / "ar" / "ar"

    # Apps that only read the imported runs go two at a time (one thread each).
    samples = BackgroundRun(python + ["-m", "ibq.cli.sample", f"run_dir={ar_run}", "classes=[0,9]", "samples_per_class=2",
                                      "metrics.fid=false", f"hydra.run.dir={tmp_path / 'samples'}"])
    evaluation = run_cli(python + ["-m", "ibq.cli.eval", f"run_dir={tokenizer_run}", "metrics.fid=false", "metrics.lpips=[]",
                                   "metrics.required=[]", "data=photos", "data.val_crops_per_photo=1"])
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    assert "psnr" in json.loads((tokenizer_run / "results.json").read_text())
    samples = samples.result()
    assert samples.returncode == 0, samples.stderr[-2000:]
    assert (tmp_path / "samples" / "grid.png").is_file() and (tmp_path / "samples" / "samples.npz").is_file()

    # Fine-tuning: a new run that starts from the imported weights, with the parent's model overrides.
    parent = json.loads((tokenizer_run / "run.json").read_text())
    fine_tuned = tmp_path / "fine_tuned"
    fine_tuning = BackgroundRun(train_args(fine_tuned, f"init_from={tokenizer_run}", *parent["overrides"], "discriminator.n_layers=1",
                                           "train.steps=2", "eval.rfid=false"))

    tokens = tmp_path / "tokens"
    tokenize = run_cli(python + ["-m", "ibq.cli.tokenize", f"tokenizer_run={tokenizer_run}", "samples=16", f"hydra.run.dir={tokens}"])
    assert tokenize.returncode == 0, tokenize.stderr[-2000:]

    stage_two = run_cli(python + ["-m", "ibq.cli.train_ar", f"tokenizer_run={tokenizer_run}", f"tokens={tokens}", "logger=none",
                                  "ar_train.steps=2", "ar_train.batch_size=8", "ar_train.grid_classes=0", "data.resolution=8",
                                  "transformer.vocab_size=64", "transformer.block_size=16", "transformer.depth=1",
                                  "transformer.width=32", "transformer.heads=2", "transformer.ffn_hidden=64",
                                  f"hydra.run.dir={tmp_path / 'trained_ar'}"])
    assert stage_two.returncode == 0, stage_two.stderr[-2000:]

    result = fine_tuning.result()
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((fine_tuned / "run.json").read_text())
    assert record["parent"]["run_dir"] == str(tokenizer_run) and record["parent"]["signature"] == parent["signature"]
    assert record["parent"]["imported"]["file"] == "ar_tiny.ckpt" and record["signature"] != parent["signature"]

    table = run_cli(python + ["-m", "ibq.cli.sweep", "table", str(tmp_path), "--format", "csv"])
    assert table.returncode == 0, table.stderr[-2000:]
    rows = table.stdout.strip().splitlines()[1:]  # the imported tokenizer, the fine-tuned run and the trained AR run
    assert len(rows) == 3 and any(str(tokenizer_run) in row for row in rows)


def test_a_fine_tuning_parent_is_part_of_the_signature_as_an_absolute_path(tmp_path: Path, monkeypatch):
    from ibq.runs.record import signature, tokenizer_identity

    monkeypatch.chdir(tmp_path)
    own = tokenizer_identity(composed(["init_from=runs/parent"], "train").cfg)
    assert own.init_from == str(tmp_path / "runs" / "parent")
    assert signature(own) != signature(tokenizer_identity(composed([], "train").cfg))


TEN_PHOTOS = "data.photos=[astronaut,chelsea,coffee,rocket,hubble_deep_field,immunohistochemistry,retina,stereo_motorcycle,camera,brick]"


@pytest.mark.slow
def test_a_generator_fine_tunes_from_an_imported_one_on_the_tokenizer_it_was_trained_on(imported: Path, tmp_path: Path):
    parent = tmp_path / "parent"  # a copy, removed once the fine-tuning run has started from it
    shutil.copytree(imported / "ar" / "ar", parent)
    record = json.loads((parent / "run.json").read_text())

    def fine_tune(run_dir: Path, *overrides: str) -> list[str]:  # the parent's shape: 10 classes
        return [sys.executable, "-m", "ibq.cli.train_ar", f"init_from={parent}", *record["overrides"], TEN_PHOTOS, "logger=none",
                "ar_train.steps=2", "ar_train.batch_size=8", "ar_train.grid_classes=0", *overrides, f"hydra.run.dir={run_dir}"]

    # A learning rate too small to move the weights: what the run starts from is what it saves.
    fine_tuned = tmp_path / "fine_tuned"
    training = BackgroundRun(fine_tune(fine_tuned, "ar_optim.lr=1e-12"))
    eleven = "data.photos=[astronaut,chelsea,coffee,rocket,hubble_deep_field,immunohistochemistry,retina,stereo_motorcycle,camera,brick,grass]"
    refusals = {
        "another tokenizer": (f"tokenizer_run={imported / 'ema'}",),
        "another shape": ("transformer.depth=3",),
        "more classes": (eleven,),
        "another label set": (eleven, "transformer.num_classes=11"),
    }
    refused = {why: run_cli(fine_tune(tmp_path / why, *overrides)) for why, overrides in refusals.items()}
    line = error_line(refused["another tokenizer"])
    assert f"init_from={parent} was trained on the tokens of another tokenizer" in line
    assert line.endswith(f"give its own, tokenizer_run={imported / 'ar' / 'tokenizer'}")
    line = error_line(refused["another shape"])
    assert f"init_from={parent} does not fit this run's transformer (the parent's overrides, as a shell takes them: model_scale=tiny" in line
    assert "missing 9 tensor(s), e.g. blocks.2." in line
    line = error_line(refused["more classes"])  # before the run starts, as for any stage-II run
    assert line == "error: the training data has class index 10, outside the model's classes 0..9: set transformer.num_classes=11 or more"
    line = error_line(refused["another label set"])
    assert line == (f"error: init_from={parent} has 10 classes and this run 11 (transformer.num_classes=11): give its number for the same "
                    f"labels (transformer.num_classes=10), or init_from_classes=fresh to start the class embeddings anew for a label set "
                    f"of this run's own")
    assert not any((tmp_path / why).exists() for why in refusals)
    relabelled = tmp_path / "relabelled"  # eleven classes of its own: new class rows, the rest from the parent
    relabelling = BackgroundRun(fine_tune(relabelled, eleven, "transformer.num_classes=11", "init_from_classes=fresh", "ar_optim.lr=1e-12"))

    result = training.result()
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"fine-tuned from       {parent} (step 0, signature {record['signature']})" in result.stdout
    own = json.loads((fine_tuned / "run.json").read_text())
    provenance = {key: record["imported"][key] for key in ("file", "sha256", "weights")}
    assert own["parent"] == {"run_dir": str(parent), "checkpoint": str(parent / "checkpoints" / "last.pt"), "signature": record["signature"],
                             "step": 0, "imported": provenance}
    assert own["signature"] != record["signature"] and own["status"] == "completed"
    started, saved = (torch.load(path / "checkpoints" / "last.pt", weights_only=True)["model"] for path in (parent, fine_tuned))
    assert started.keys() == saved.keys()
    for name in started:
        torch.testing.assert_close(saved[name], started[name], rtol=0, atol=1e-6, msg=name)

    result = relabelling.result()
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"fine-tuned from       {parent} (step 0, signature {record['signature']}); class embeddings new for its 11 classes "
            f"(the parent's 10)") in result.stdout
    assert json.loads((relabelled / "run.json").read_text())["parent"]["fresh_classes"] == {"run": 11, "parent": 10}
    fresh = torch.load(relabelled / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name in started:
        if name != "class_embed.weight":
            torch.testing.assert_close(fresh[name], started[name], rtol=0, atol=1e-6, msg=name)
    classes = fresh["class_embed.weight"]
    assert classes.shape == (12, started["class_embed.weight"].shape[1])
    torch.testing.assert_close(classes[-1], started["class_embed.weight"][-1], rtol=0, atol=1e-6)  # CFG's null class
    assert not torch.allclose(classes[:10], started["class_embed.weight"][:10], atol=1e-3)

    # Resuming reads its own checkpoint, not the parent, which is gone; run.json keeps the parent it started from.
    shutil.rmtree(parent)
    resumed = run_cli(fine_tune(fine_tuned, "ar_optim.lr=1e-12"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"fine-tuned from       {parent} (step 0, signature {record['signature']})" in resumed.stdout
    again = json.loads((fine_tuned / "run.json").read_text())
    assert again["parent"] == own["parent"] and again["resumes"][-1]["step"] == 2 and again["status"] == "completed"


def test_a_generator_trained_from_scratch_keeps_its_signature_and_a_parent_signs_as_an_absolute_path(tmp_path: Path, monkeypatch):
    from ibq.runs.record import signature, stage_two_config

    monkeypatch.chdir(tmp_path)
    tokenizer = {"signature": "0" * 12, "step": 1, "codebook_size": 64, "weights": "ema"}
    scratch = composed(["tokenizer_run=tok"], "train_ar").cfg
    own, identity = stage_two_config(scratch, tmp_path / "tok", tokenizer)
    assert "init_from" not in own and "init_from" not in identity  # as before init_from existed: resumes still match
    assert "init_from_classes" not in own
    own, fine_tuning = stage_two_config(composed(["tokenizer_run=tok", "init_from=runs/parent"], "train_ar").cfg, tmp_path / "tok", tokenizer)
    assert own.init_from == fine_tuning.init_from == str(tmp_path / "runs" / "parent")
    assert signature(fine_tuning) != signature(identity) and "init_from_classes" not in own  # the parent's classes, as before
    _, relabelled = stage_two_config(composed(["tokenizer_run=tok", "init_from=runs/parent", "init_from_classes=fresh"], "train_ar").cfg,
                                     tmp_path / "tok", tokenizer)
    assert relabelled.init_from_classes == "fresh" and signature(relabelled) != signature(fine_tuning)


def test_fresh_class_embeddings_need_a_parent_and_a_known_choice():
    from ibq.config import check_values
    from ibq.engine.job_config import check_ar_keys
    from ibq.errors import UserError

    with pytest.raises(UserError, match=r"^init_from_classes=fresh starts a fine-tuning run's class embeddings anew, but init_from is not "
                                        r"given: give init_from=<generator run>, or leave init_from_classes out$"):
        check_ar_keys(composed(["tokenizer_run=tok", "init_from_classes=fresh"], "train_ar").cfg)
    with pytest.raises(UserError, match=r"^init_from_classes='new' is invalid: it must be parent \(its class embeddings\) or fresh "):
        check_values(composed(["init_from=runs/parent", "init_from_classes=new"], "train_ar").cfg)


@pytest.mark.slow
def test_interrupted_sampling_leaves_no_partial_images(imported: Path, tmp_path: Path):
    out = tmp_path / "samples"
    sampling = BackgroundRun([sys.executable, "-m", "ibq.cli.sample", f"run_dir={imported / 'ar' / 'ar'}", "samples_per_class=5000",
                              "metrics.fid=false", f"hydra.run.dir={out}"])
    partial, deadline = out / ".samples.npy", time.time() + 120
    while not partial.exists() and time.time() < deadline and sampling.process.poll() is None:
        time.sleep(0.05)
    assert partial.exists()
    sampling.process.send_signal(signal.SIGINT)
    result = sampling.result(timeout=120)
    assert result.returncode == 130 and "error: interrupted (Ctrl-C): run the same command again to start it again" in result.stderr
    assert not partial.exists() and not (out / "samples.npz").exists()


@pytest.mark.slow
def test_a_sampling_split_over_jobs_is_the_sampling_and_is_scored_as_one_set(imported: Path, tmp_path: Path, monkeypatch):
    import numpy as np
    from hydra import compose, initialize_config_dir

    from ibq.config import CONF_DIR
    from ibq.engine.evaluation_run import evaluate_generation
    from ibq.metrics import networks
    from ibq.metrics.adm import save_adm_npz
    from test_eval import StandInNetwork

    app, sampling = [sys.executable, "-m", "ibq.cli.sample"], [f"run_dir={imported / 'ar' / 'ar'}", "samples_per_class=3", "batch_size=5"]
    whole = BackgroundRun(app + sampling + [f"hydra.run.dir={tmp_path / 'whole'}", "metrics.fid=false"])
    split = run_cli(app + ["-m", *sampling, "parts=2", "part=0,1", f"hydra.sweep.dir={tmp_path / 'parts'}"])
    assert split.returncode == 0, split.stderr[-3000:]
    assert f"once every part is drawn: ibq-eval samples={tmp_path / 'parts'} run_dir=" in split.stdout  # no gFID of half a set
    unscored = run_cli([sys.executable, "-m", "ibq.cli.sweep", "table", str(tmp_path / "parts")])
    assert unscored.returncode == 2 and unscored.stderr.startswith(f"error: {tmp_path / 'parts'} holds 2 sampling(s), none scored:")
    assert "ibq-eval samples=<their sweep folder> run_dir=<AR run>" in unscored.stderr
    assert whole.result().returncode == 0
    drawn = [np.load(tmp_path / "parts" / f"batch_size=5,part={part},parts=2,samples_per_class=3" / "samples.npz")["arr_0"]
             for part in (0, 1)]
    unsplit = np.load(tmp_path / "whole" / "samples.npz")["arr_0"]
    # Part 0 holds the first 15 of the 30 labels and draws with seed 0 x 2 + 0, as the unsplit sampling does; part 1 with seed 1.
    assert [len(part) for part in drawn] == [15, 15]
    np.testing.assert_array_equal(drawn[0], unsplit[:15])
    assert not np.array_equal(drawn[1], unsplit[15:])

    network = StandInNetwork()
    monkeypatch.setattr(networks, "load_fid_network", lambda path=None, device="cpu": network)
    joined = save_adm_npz(tmp_path / "joined.npz", np.concatenate(drawn))
    scores = {}
    for name, samples in (("parts", tmp_path / "parts"), ("joined", joined)):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("eval", overrides=[f"samples={samples}", "data=photos", "metrics.is=false", "reference.limit=16",
                                             f"reference.cache_dir={tmp_path / 'cache'}", f"output={tmp_path / name}.json"])
        scores[name] = evaluate_generation(cfg, {"data": "photos"}).results
    # The same images in the same order; only the float64 sums run over other batches (one file's batches end at its end).
    assert scores["parts"]["eval/samples"] == 30 and scores["parts"]["gfid"] == pytest.approx(scores["joined"]["gfid"], rel=1e-12)
    part_record = json.loads((tmp_path / "parts" / "batch_size=5,part=0,parts=2,samples_per_class=3" / "results.json").read_text())
    assert scores["parts"]["eval/sampling"] == {**part_record["sampling"], "seed": 0} and scores["joined"]["eval/sampling"] is None
