"""The tokenizer step's efficiency contract, on CPU: no host synchronisation between log steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import cpu_threads, graph_host_reads, record_host_reads
import ibq.cli.common  # noqa: F401  (registers the resolvers the configs use)
from ibq.config import CONF_DIR
from ibq.engine import train_tokenizer
from ibq.engine.acceleration import StepAcceleration
from ibq.engine.train_tokenizer import TokenizerTraining
from ibq.errors import UserError


def tiny_training(tmp_path: Path, *overrides: str) -> TokenizerTraining:
    """On CPU, where these tests make their images, also on a machine with a GPU (an override may move it)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", "eval.rfid=false", "data.val_crops_per_photo=1", "train.steps=4",
                                          "train.device=cpu", *overrides])
    return TokenizerTraining(cfg, tmp_path / "run")


def micro_batches(training: TokenizerTraining, count: int = 1) -> list[torch.Tensor]:
    resolution = training.cfg.data.resolution
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(training.layout.micro_batch, 3, resolution, resolution, generator=generator) * 2 - 1 for _ in range(count)]


def test_the_step_reads_nothing_on_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    accumulation = 2  # both micro-batch paths: the discriminator's without gradients, the generator's recomputed
    training = tiny_training(tmp_path, "train.micro_batch_size=8", "train.batch_size=16")
    autocast = torch.autocast("cpu", enabled=False)
    batches = micro_batches(training, accumulation)
    training._step(1, batches, autocast)  # warm-up: lazy state (optimizer steps) is created here

    reads = record_host_reads(monkeypatch)
    for step in (2, 3):
        metrics = training._step(step, batches, autocast)
    monkeypatch.undo()

    assert reads == [], f"host reads inside the step: {sorted(set(reads))}"
    assert all(isinstance(value, torch.Tensor) and value.shape == () for value in metrics.values())
    assert {"loss/g", "loss/d", "loss/quantizer", "codebook/batch_utilization"} <= metrics.keys()
    training.divergence.check(3)  # the log step's one read: every loss was finite


@pytest.mark.parametrize("quantizer", ["ibq", "vq"])
def test_the_tokenizers_gradients_are_the_same_bits_at_every_call(tmp_path: Path, quantizer: str):
    """The same step twice, on a CPU's threads: two runs of one command stay equal only if every gradient
    does (the codebook's, summed by indexing's backward in the threads' order, differed in its last bits
    almost every call, and runs of the demo parted after a few dozen steps)."""
    training = tiny_training(tmp_path, f"quantizer={quantizer}")
    tokenizer, images = training.tokenizer, micro_batches(training)[0]
    with cpu_threads(2):
        calls = []
        for _ in range(8):
            tokenizer.zero_grad(set_to_none=True)
            quantized = tokenizer.encode(images)
            ((tokenizer.decode(quantized.z_q) - images).abs().mean() + quantized.loss).backward()
            calls.append([p.grad.clone() for p in tokenizer.parameters() if p.grad is not None])
    for call in calls[1:]:
        assert all(torch.equal(a, b) for a, b in zip(calls[0], call, strict=True))


def first_losses(training: TokenizerTraining, steps: int = 2, device: str = "cpu") -> list[dict[str, float]]:
    batches = [x.to(device) for x in micro_batches(training)]
    autocast = torch.autocast(device, enabled=False)
    return [{name: float(value) for name, value in training._step(step, batches, autocast).items()} for step in range(1, steps + 1)]


@pytest.mark.parametrize(
    "switches",
    [
        ["train.channels_last=true", "train.activation_checkpointing=true"],
        ["train.activation_checkpointing=norms"],
        # Inductor's CPU code generation takes minutes for this step on 2 cores (and does not pay on
        # CPU, hence auto = CUDA only): here dynamo and AOTAutograd trace the step and run their graphs
        # eagerly, which checks the compiled step's structure and values, not Inductor's kernels.
        pytest.param(["train.compile=true", "train.channels_last=true"], marks=pytest.mark.slow, id="compiled"),
    ],
)
def test_the_step_options_give_the_plain_step_losses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, switches: list[str]):
    """The first step's losses within 1e-5 relative (same weights: the options change summation orders
    only); the second's within 2%: Adam's first update is about lr * g / |g| per weight, so rounding-level
    differences in near-zero gradients become whole steps."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **options: compile_module(module, backend="aot_eager"))
    plain = first_losses(tiny_training(tmp_path / "plain"))
    optimised = tiny_training(tmp_path / "optimised", *switches)
    assert all(optimised.acceleration.record()[switch.split(".")[1].split("=")[0]] for switch in switches)
    first, second = first_losses(optimised)
    assert first == pytest.approx(plain[0], rel=1e-5, abs=1e-6)
    assert second == pytest.approx(plain[1], rel=2e-2, abs=1e-4)


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        ({}, {"cpu": (False, False), "cuda": (True, True)}),
        ({"compile": False}, {"cpu": (False, False), "cuda": (False, False)}),  # eager GroupNorm is slow in NHWC
        ({"compile": True}, {"cpu": (True, True), "cuda": (True, True)}),
        ({"channels_last": True}, {"cpu": (False, True), "cuda": (True, True)}),
    ],
)
def test_channels_last_follows_compilation_unless_set(train: dict, expected: dict, gpu_reported):
    gpu_reported((9, 0))
    for device, (compiled, channels_last) in expected.items():
        acceleration = StepAcceleration.from_config(OmegaConf.create(train), torch.device(device))
        assert (acceleration.compiled, acceleration.channels_last) == (compiled, channels_last), device
    with pytest.raises(UserError, match=r"train.channels_last='yes' is invalid: valid are auto \(on where compiled\), true, false"):
        StepAcceleration.from_config(OmegaConf.create({"channels_last": "yes"}), torch.device("cpu"))


def test_compile_takes_torch_compile_modes(gpu_reported):
    gpu_reported((9, 0))

    def mode(value, device="cpu"):
        return StepAcceleration.from_config(OmegaConf.create({"compile": value}), torch.device(device))

    assert [mode(value).compile for value in (False, "none", True, "default", "reduce-overhead", "max-autotune")] == [
        "none", "none", "default", "default", "reduce-overhead", "max-autotune"]
    assert (mode("auto").compile, mode("auto", "cuda").compile) == ("none", "default")
    assert mode("reduce-overhead").channels_last and not mode("none", "cuda").channels_last
    with pytest.raises(UserError, match=r"train.compile='maybe' is invalid: valid are auto \(default on CUDA, none elsewhere\), "
                                        r"none, default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs \(false: none, true: default\)"):
        mode("maybe")


@pytest.mark.parametrize(
    ("gpu", "reason"),
    [
        (((6, 0), "Tesla P100-PCIE-16GB"), "Tesla P100-PCIE-16GB has compute capability 6.0, and Triton needs 7.0 or more"),
        (((8, 0), "NVIDIA A100", False), "the triton package is not installed"),
    ],
)
def test_a_gpu_triton_does_not_serve_trains_eagerly_unless_compilation_is_asked_for(gpu, reason, gpu_reported, caplog):
    """torch.compile would fail inside the first step there, after minutes of set-up."""
    gpu_reported(*gpu)
    acceleration = StepAcceleration.from_config(OmegaConf.create({}), torch.device("cuda"))
    assert acceleration.record() == {"compile": "none", "channels_last": False, "activation_checkpointing": "none"}
    assert f"train.compile=auto runs the networks eagerly: torch.compile cannot generate kernels here ({reason})" in caplog.text
    for value in (True, "reduce-overhead"):
        with pytest.raises(UserError) as refusal:
            StepAcceleration.from_config(OmegaConf.create({"compile": value}), torch.device("cuda"))
        mode = "default" if value is True else value
        assert str(refusal.value) == f"train.compile={mode} cannot run on cuda: {reason}; give train.compile=false"
    assert not StepAcceleration.from_config(OmegaConf.create({"compile": False}), torch.device("cuda")).compiled


def test_the_compile_mode_reaches_torch_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **options: modes.append((type(module).__name__, options)))
    training = tiny_training(tmp_path, "train.compile=reduce-overhead")
    assert training.acceleration.record()["compile"] == "reduce-overhead"
    assert modes == [(name, {"mode": "reduce-overhead"}) for name in ("Encoder", "Decoder", "PatchDiscriminator")]  # no LPIPS weights here


def test_activation_checkpointing_names_what_is_recomputed():
    def recomputed(value):
        return StepAcceleration.from_config(OmegaConf.create({"activation_checkpointing": value}), torch.device("cpu")).activation_checkpointing

    assert [recomputed(value) for value in (False, "none", "norms", "blocks", True)] == ["none", "none", "norms", "blocks", "blocks"]
    with pytest.raises(UserError, match=r"train.activation_checkpointing='all' is invalid: valid are none, norms, blocks \(false: none, true: blocks\)"):
        recomputed("all")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: Inductor's CUDA kernels")
def test_the_compiled_step_gives_the_eager_losses_on_cuda(tmp_path: Path):
    """What train.compile=auto runs on CUDA, Inductor's kernels, in fp32: the first step's losses within
    2e-3 relative of the eager step's (fused kernels and TF32 convolutions sum in other orders), the
    second's within 2% (Adam's first update, as above)."""
    eager = first_losses(tiny_training(tmp_path / "eager", "train.device=cuda", "train.compile=false", "train.precision=fp32"), device="cuda")
    compiled = tiny_training(tmp_path / "compiled", "train.device=cuda", "train.compile=true", "train.precision=fp32")
    assert compiled.acceleration.record() == {"compile": "default", "channels_last": True, "activation_checkpointing": "none"}
    first, second = first_losses(compiled, device="cuda")
    assert first == pytest.approx(eager[0], rel=2e-3, abs=1e-5)
    assert second == pytest.approx(eager[1], rel=2e-2, abs=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: CUDA graphs")
def test_cuda_graphs_replay_the_compiled_step(tmp_path: Path):
    """train.compile=reduce-overhead runs each network as the default mode's kernels, warmed up at the
    first step, recorded as CUDA graphs at the second and replayed from the third: the losses of four
    steps are the default mode's (a replay that read stale or overwritten buffers would not be)."""
    def losses(mode: str) -> list[dict[str, float]]:
        training = tiny_training(tmp_path / mode, "train.device=cuda", f"train.compile={mode}", "train.precision=fp32")
        return first_losses(training, steps=4, device="cuda")

    replayed, compiled = losses("reduce-overhead"), losses("default")
    for step, expected in zip(replayed, compiled, strict=True):
        assert step == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: CUDA reports its own synchronisations")
def test_the_step_never_waits_for_the_gpu(tmp_path: Path):
    training = tiny_training(tmp_path, "train.device=cuda", "train.compile=false")
    batches = [x.cuda() for x in micro_batches(training)]
    autocast = torch.autocast("cuda", dtype=training.dtype, enabled=training.dtype != torch.float32)
    training._step(1, batches, autocast)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (2, 3):
            training._step(step, batches, autocast)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: page-locked host memory")
def test_training_batches_reach_the_gpu_from_page_locked_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A non_blocking copy from pageable memory may wait for the stream (the driver stages it), which would
    stall the host once per micro-batch however free of synchronisation the step is."""
    pinned = []

    class Recorded:
        def __init__(self, batches):
            self.batches = batches

        def __next__(self):
            images, labels = next(self.batches)
            pinned.append(images.is_pinned())
            return images, labels

        def __getattr__(self, name):  # state(), counters()
            return getattr(self.batches, name)

    made = train_tokenizer.training_batches
    monkeypatch.setattr(train_tokenizer, "training_batches", lambda *args, **kwargs: Recorded(made(*args, **kwargs)))
    training = tiny_training(tmp_path, "train.device=cuda", "train.compile=false", "train.steps=2", "logger=none")
    training.run({}, [], None)
    assert pinned == [True, True]


def test_the_compiled_networks_trace_as_one_graph_each(tmp_path: Path, whole_graph):
    """train.compile compiles the encoder, the decoder (with each activation checkpointing), the
    discriminator and LPIPS. Each must trace whole, with no value read back to the host: a graph break
    would cut it into graphs with Python between them, launched one after the other. Traced, each gives
    its eager output."""
    import lpips

    training = tiny_training(tmp_path)
    tokenizer = training.tokenizer
    perceptual = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval().requires_grad_(False)  # random backbone
    images = micro_batches(training)[0]
    latents = tokenizer.encoder(images)
    networks = [(tokenizer.encoder, (images,)), (tokenizer.decoder, (latents,)), (training.discriminator, (images,)), (perceptual, (images, images.flip(0)))]
    for checkpointing in ("none", "norms", "blocks"):
        tokenizer.set_activation_checkpointing(checkpointing)
        for network, inputs in networks[: 2 if checkpointing != "none" else None]:
            traced, graphs = whole_graph(network)
            name = f"{type(network).__name__} (activation checkpointing {checkpointing})"
            assert torch.equal(traced(*inputs), network(*inputs)), name
            assert len(graphs) == 1 and graph_host_reads(graphs[0]) == [], name


def test_the_ema_moves_each_weight_by_one_minus_its_decay_and_copies_the_buffers():
    """The average evaluation and tokenizing use: w_ema <- d w_ema + (1 - d) w, in the shadow's dtype,
    whatever the live weights' dtype; buffers (running statistics) are taken as they are."""
    from ibq.engine.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9)
    before = {name: tensor.clone() for name, tensor in ema.shadow.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    model(torch.randn(5, 3))  # moves BatchNorm's running statistics
    model.to(torch.bfloat16)
    ema.update(model)
    for name, live in model.state_dict().items():
        average = ema.shadow.state_dict()[name]
        assert average.dtype == before[name].dtype, name
        if name in dict(model.named_parameters()):
            torch.testing.assert_close(average, 0.9 * before[name] + 0.1 * live.float(), rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(average, live.to(average.dtype)), name
