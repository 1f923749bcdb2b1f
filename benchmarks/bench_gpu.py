"""The GPU hot paths, side by side with an older version of the code: the tokenizer step, IBQ with large
codebooks, AR sampling and AR training.

On CUDA it runs the real sizes (the paper's tokenizer at 256 px, bf16; IBQ at N=4096, D=256, fp32;
AR-B and AR-XL); on CPU tiny ones, so that CI keeps it alive. It prints a header line, then one
`key: value` line per figure; with --baseline (a git ref or a checkout's folder) each figure is also
measured for that code, in the same run, as `<key>_baseline`, with `<key>_vs_baseline` (new / old,
or old / new for times and memory: above 1 is better).

Each code version runs in its own process (python benchmarks/bench_gpu.py --worker, with that
version's `ibq` first on sys.path), so neither sees the other's compiled kernels or memory.

Run from the repository root: python -m benchmarks.bench_gpu [--baseline ef75447] [--rounds 3]
    [--only tokenizer,ibq,ar_sample,ar_train] [--override=++train.compile=false] [--micro-batches 4] [--profile 25]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("tokenizer", "ibq", "ar_sample", "ar_train")
# Dense bf16 tensor-core peak per device name (TFLOP/s), the MFU denominator; --peak-tflops overrides.
# H200: 790 is the basis of the figures these benchmarks were set against.
PEAK_TFLOPS = {"H200": 790.0, "H100": 989.0, "A100": 312.0}
# Figures where smaller is better (the name holds one of these): their ratio to the baseline is old / new.
SMALLER_IS_BETTER = ("_peak_gib", "_over_dense_time", "_over_k262144_time", "_ms_per_step", "_ms_k262144", "_first_s")
# What the measured code did, for the header line rather than a figure.
SETTINGS: dict[str, object] = {}
# --profile N: the N operators taking the most time in one further call of each measured step, on stderr.
PROFILE_ROWS = 0
# The value of a figure this device cannot give, so that every figure has its line.
CUDA_ONLY = "skipped (CUDA only: torch.cuda's peak memory)"
NO_PEAK_TFLOPS = "skipped (no peak TFLOP/s known for this device: --peak-tflops)"


def smaller_is_better(key: str) -> bool:
    return any(part in key for part in SMALLER_IS_BETTER)


# -- measured in a worker process, against whichever `ibq` is on sys.path -------------------------------
def conf_dir() -> Path:
    """The config folder of the `ibq` being measured (it moved between versions)."""
    try:
        from ibq.config import CONF_DIR
    except ImportError:
        from ibq.cli.common import CONF_DIR
    return Path(CONF_DIR)


def synchronize(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int, warmup: int = 2) -> float:
    """Seconds per call, after `warmup` calls, the device synchronised around the timed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def profiled(name: str, fn, device) -> None:
    """With --profile: one more call of `fn` under torch.profiler, its operators by their own time on the
    device (on CPU, the host), as a table on stderr."""
    if not PROFILE_ROWS:
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as profiler:
        fn()
        synchronize(device)
    order = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=order, row_limit=PROFILE_ROWS)
    print(f"bench_gpu profile of {name} (one call, by {order}):\n{table}", file=sys.stderr)


def peak_gib(fn, device) -> float:
    import torch

    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def perceptual_loss_overrides(tmp: Path, overrides: list[str]) -> list[str]:
    """The real step has its LPIPS-VGG term, whose cost does not depend on the weights: without the
    VGG16 file in torch.hub's checkpoint folder (or an override naming one), a stand-in with random
    weights (the convolutions LPIPS reads) is written for the step to load. LPIPS is required, so that a
    missing `lpips` package fails rather than measure a step without it."""
    import torch
    import torchvision

    from ibq.metrics.lpips import resolve_backbone

    if any("lpips_backbone_path=" in override for override in overrides) or resolve_backbone("vgg", None).is_file():
        SETTINGS["lpips_backbone"] = "given"
        return ["loss.perceptual_required=true"]
    stand_in = tmp / "vgg16-stand-in.pth"
    features = torchvision.models.vgg16().features.state_dict()
    torch.save({f"features.{name}": weight for name, weight in features.items()}, stand_in)
    SETTINGS["lpips_backbone"] = "stand-in VGG16 with random weights"
    return [f"loss.lpips_backbone_path={stand_in}", "loss.perceptual_required=true"]


def tokenizer_figures(device, real: bool, peak_tflops: float | None, overrides: list[str], micro_batches: list[int]) -> dict:
    import torch
    from hydra import compose, initialize_config_dir
    from torch.utils.flop_counter import FlopCounterMode

    import ibq.cli.common  # noqa: F401  (the resolvers the configs use)
    from ibq.engine.train_tokenizer import TokenizerTraining

    figures = {}
    # Older code chose codebook_size as a config group, whose option names Hydra takes as strings only.
    codebook = "codebook_size='16384'" if (conf_dir() / "codebook_size").is_dir() else "codebook_size=16384"
    # The photos' shorter side is given for older code, which did not raise it to 3x the resolution itself.
    scale = (["model_scale=paper", codebook, "train.precision=bf16", "data.shorter_side=768"] if real
             else ["train.precision=fp32"])
    with tempfile.TemporaryDirectory() as tmp:
        if real:
            scale += perceptual_loss_overrides(Path(tmp), overrides)
        for micro_batch in micro_batches:
            with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
                cfg = compose("train", overrides=[*scale, "logger=none", "eval.rfid=false", "train.steps=10",
                                                  f"train.batch_size={micro_batch}", "loss.disc_start=0", *overrides])
            training = TokenizerTraining(cfg, Path(tmp) / f"mb{micro_batch}")
            side = cfg.data.resolution
            images = [torch.rand(micro_batch, 3, side, side, device=device) * 2 - 1]
            if hasattr(training, "acceleration"):
                images = [x.contiguous(memory_format=training.acceleration.memory_format) for x in images]
            autocast = torch.autocast(device.type, dtype=training.dtype, enabled=training.dtype != torch.float32)
            # The step's signature before and after the finiteness check moved into the training object.
            takes_last_good = "last_good" in inspect.signature(training._step).parameters
            step = iter(range(1, 10**6))

            def one_step():
                args = (next(step), images, None, autocast) if takes_last_good else (next(step), images, autocast)
                training._step(*args)

            first = timed(one_step, device, repeats=1, warmup=0)  # with torch.compile: its compilation
            figures[f"tokenizer_step_first_s_mb{micro_batch}"] = first
            seconds = timed(one_step, device, repeats=10 if real else 3, warmup=2 if real else 0)
            profiled(f"tokenizer_step_mb{micro_batch}", one_step, device)
            figures[f"tokenizer_step_images_per_s_mb{micro_batch}"] = micro_batch / seconds
            if micro_batch == 32:
                figures["tokenizer_step_peak_gib_mb32"] = peak_gib(one_step, device) if device.type == "cuda" else CUDA_ONLY
            elif micro_batch == 4:
                with FlopCounterMode(display=False) as counter:
                    one_step()
                flop_per_image = counter.get_total_flops() / micro_batch
                SETTINGS["tokenizer_tflop_per_image"] = round(flop_per_image / 1e12, 4)
                figures["tokenizer_step_mfu_mb4"] = (micro_batch / seconds * flop_per_image / (peak_tflops * 1e12)
                                                     if peak_tflops else NO_PEAK_TFLOPS)
            SETTINGS["lpips"] = training.lpips is not None
            SETTINGS["acceleration"] = training.acceleration.record() if hasattr(training, "acceleration") else None
            del training
            # A run compiles for its one micro-batch: without this, Dynamo would recompile the next size's
            # step with a dynamic batch dimension, which no run uses.
            torch.compiler.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return figures


def chunked_ibq_path(device, quantizer) -> str:
    """What chunked IBQ runs by default on this device in the measured code: the fused Triton kernels
    (forward, and backward since they exist) or torch's GEMMs and elementwise ops."""
    import torch

    try:
        from ibq.quantizers import triton_ibq
    except ImportError:  # code from before the kernels
        return "torch"
    if getattr(quantizer, "chunk_kernels", "triton") != "triton" or not triton_ibq.available(torch.empty(0, device=device)):
        return "torch"
    return "triton fwd+bwd" if hasattr(triton_ibq, "logit_gradients") else "triton fwd, torch bwd"


def ibq_figures(device, real: bool) -> dict:
    import torch

    from ibq.quantizers import IBQ

    tokens, dim = (4096, 256) if real else (256, 32)
    small, large, chunk = (2**18, 2**20, 8192) if real else (2**12, 2**14, 1024)
    generator = torch.Generator(device).manual_seed(0)
    z = torch.randn(tokens // 16, dim, 4, 4, device=device, generator=generator)
    upstream = torch.randn_like(z)

    def fwd_bwd(quantizer):
        def call():
            z_leaf = z.clone().requires_grad_()
            out = quantizer(z_leaf)
            ((out.z_q * upstream).sum() + out.loss).backward()
            quantizer.codebook.weight.grad = None
        return call

    def quantizer(size, chunk_size, **options):
        torch.manual_seed(0)
        return IBQ(size, dim, chunk_size=chunk_size, **options).to(device)

    repeats = 5 if real else 2
    dense = timed(fwd_bwd(quantizer(small, None)), device, repeats)
    chunked_small = quantizer(small, chunk)
    chunked = timed(fwd_bwd(chunked_small), device, repeats)
    profiled("ibq_chunked_k262144", fwd_bwd(chunked_small), device)
    chunked_large = timed(fwd_bwd(quantizer(large, 4 * chunk)), device, repeats)
    SETTINGS["ibq"] = f"N={tokens} D={dim} K={small},{large} chunk={chunk},{4 * chunk} fp32 ({chunked_ibq_path(device, chunked_small)})"
    figures = {
        "ibq_dense_ms_k262144": dense * 1e3,
        "ibq_chunked_ms_k262144": chunked * 1e3,
        "ibq_chunked_over_dense_time_k262144": chunked / dense,
        "ibq_k1048576_over_k262144_time": chunked_large / chunked,
    }
    figures["ibq_chunked_peak_gib_k262144"] = peak_gib(fwd_bwd(chunked_small), device) if device.type == "cuda" else CUDA_ONLY
    if "chunk_kernels" in inspect.signature(IBQ).parameters and device.type == "cuda":
        from ibq.quantizers.chunked import KERNELS

        for kernels in ("triton", "triton_rows"):
            if kernels in KERNELS:
                other = quantizer(small, chunk, chunk_kernels=kernels)
                figures[f"ibq_{kernels}_ms_k262144"] = timed(fwd_bwd(other), device, repeats) * 1e3
                figures[f"ibq_{kernels}_over_dense_time_k262144"] = figures[f"ibq_{kernels}_ms_k262144"] / (dense * 1e3)
                figures[f"ibq_{kernels}_peak_gib_k262144"] = peak_gib(fwd_bwd(other), device)
                profiled(f"ibq_{kernels}_k262144", fwd_bwd(other), device)
    return figures


def ar_model(scale: str, device, real: bool):
    import torch
    from omegaconf import OmegaConf

    from ibq.models.transformer import Transformer

    kwargs = OmegaConf.to_container(OmegaConf.load(conf_dir() / "model_scale" / f"{scale if real else 'tiny'}.yaml").transformer)
    kwargs.pop("_target_")
    with torch.device(device):
        model = Transformer(**kwargs)
    torch.nn.init.normal_(model.head.weight, std=0.02)  # a non-uniform distribution, as after training
    return model


def ar_sample_figures(device, real: bool) -> dict:
    import torch

    from ibq.generation import sample

    model = ar_model("B", device, real).eval()
    batch = 32 if real else 4
    labels = torch.arange(batch, device=device) % model.num_classes
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    try:  # the model as ibq-sample holds it, in code that does so
        from ibq.generation import hold_linear_weights_in
    except ImportError:
        SETTINGS["ar_sample_weights"] = "fp32 under autocast"
    else:
        hold_linear_weights_in(model, dtype)
        SETTINGS["ar_sample_weights"] = f"linear layers in {str(dtype).removeprefix('torch.')}"

    def run(use_cache: bool):
        def call():
            with autocast:
                sample(model, labels, cfg_scale=2.25, temperature=1.1, use_cache=use_cache, seed=0)
        return call

    cached = timed(run(True), device, repeats=3 if real else 2)
    profiled("ar_sample_B_b32", run(True), device)
    recomputed = timed(run(False), device, repeats=1, warmup=1)
    return {
        "ar_sample_B_b32_tokens_per_s": batch * model.block_size / cached,
        "ar_sample_B_b32_ms_per_step": cached / model.block_size * 1e3,
        "ar_kv_cache_speedup_B_b32": recomputed / cached,
    }


def ar_train_figures(device, real: bool, peak_tflops: float | None) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ibq.models.transformer import next_token_loss

    figures = {}
    for scale, micro_batch in (("B", 96), ("XL", 48)):
        model = ar_model(scale, device, real).train()
        micro_batch = micro_batch if real else 4
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        tokens = torch.randint(model.vocab_size, (micro_batch, model.block_size), device=device)
        labels = torch.randint(model.num_classes, (micro_batch,), device=device)
        # On CUDA only the flash kernel is allowed: the step fails if attention could not use it.
        backends = [SDPBackend.FLASH_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]

        def step():
            with sdpa_kernel(backends), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = next_token_loss(model(tokens, labels), tokens)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = timed(step, device, repeats=10 if real else 2)
        profiled(f"ar_train_{scale}", step, device)
        parameters = sum(p.numel() for p in model.parameters())
        tokens_per_s = micro_batch * model.block_size / seconds
        figures[f"ar_train_{scale}_tokens_per_s"] = tokens_per_s
        figures[f"ar_train_{scale}_mfu"] = 6 * parameters * tokens_per_s / (peak_tflops * 1e12) if peak_tflops else NO_PEAK_TFLOPS
        del model, optimizer
    SETTINGS["ar_train_attention"] = "flash only" if device.type == "cuda" else "any"
    return figures


def worker(parts: list[str], size: str, peak_tflops: float | None, overrides: list[str], micro_batches: list[int],
           profile_rows: int) -> dict:
    import torch

    global PROFILE_ROWS
    PROFILE_ROWS = profile_rows
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    real = size == "real" or (size == "auto" and device.type == "cuda")
    if device.type == "cuda" and peak_tflops is None:
        name = torch.cuda.get_device_name(device)
        peak_tflops = next((value for key, value in PEAK_TFLOPS.items() if key in name), None)
    figures = {}
    if "tokenizer" in parts:
        figures.update(tokenizer_figures(device, real, peak_tflops, overrides, micro_batches))
    if "ibq" in parts:
        figures.update(ibq_figures(device, real))
    if "ar_sample" in parts:
        figures.update(ar_sample_figures(device, real))
    if "ar_train" in parts:
        figures.update(ar_train_figures(device, real, peak_tflops))
    header = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "sizes": "real" if real else "tiny",
        "peak_tflops": peak_tflops,
        "overrides": " ".join(overrides) or None,
        **SETTINGS,
    }
    return {"header": header, "figures": figures}


# -- the comparison ------------------------------------------------------------------------------------
def checkout(baseline: str, into: Path) -> Path:
    """The baseline's code: a folder as it is, or a git ref exported with git archive."""
    if Path(baseline).is_dir():
        return Path(baseline).resolve()
    archive = into / "baseline.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), baseline], cwd=REPO, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "baseline", filter="data")
    return into / "baseline"


def code_env(code: Path) -> dict[str, str]:
    """The environment of a process that runs the code in `code`: its `ibq` first on the import path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])}


def measure(code: Path, args: argparse.Namespace) -> dict | str:
    """The worker's figures, or the end of its error output."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--only", ",".join(args.only), "--size", args.size]
    if args.peak_tflops:
        command += ["--peak-tflops", str(args.peak_tflops)]
    command += [f"--override={override}" for override in args.override]
    command += ["--micro-batches", ",".join(map(str, args.micro_batches))]
    if args.profile:
        command += ["--profile", str(args.profile)]
    result = subprocess.run(command, cwd=code, env=code_env(code), capture_output=True, text=True)
    if result.returncode:
        return result.stderr[-3000:]
    if args.profile:
        print(f"bench_gpu: the worker's stderr for the code in {code}, with its profiles:\n{result.stderr}", file=sys.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def ratio(key: str, new: float, old: float) -> float:
    return old / new if smaller_is_better(key) else new / old


def best_of(runs: list[dict]) -> dict:
    """The runs' header and, per figure, its best value over the runs (a skipped figure's reason is the
    same in every run)."""
    figures = {}
    for key in runs[0]["figures"]:
        values = [run["figures"][key] for run in runs]
        figures[key] = min(values) if smaller_is_better(key) else max(values)
    return {"header": runs[0]["header"], "figures": figures}


def shown(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.4g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="git ref or folder of the code to compare with (e.g. ef75447)")
    parser.add_argument("--only", default=",".join(PARTS), type=lambda s: s.split(","), help=f"comma-separated: {','.join(PARTS)}")
    parser.add_argument("--size", choices=("auto", "tiny", "real"), default="auto", help="auto: real on CUDA, tiny on CPU")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak for MFU")
    parser.add_argument("--override", action="append", default=[],
                        help="a Hydra override for the tokenizer step, for both codes (++key=value adds a key the baseline lacks), "
                             "e.g. --override=++train.compile=false")
    parser.add_argument("--micro-batches", default=[4, 32], type=lambda s: [int(n) for n in s.split(",")],
                        help="the tokenizer step's micro-batches (comma-separated; the step is compiled for each)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measurements of each code, alternating, the best counting (on a shared machine: 3)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after measuring, profile one more call of each step and print its N costliest operators to stderr")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = sorted(set(args.only) - set(PARTS))
    if unknown:
        sys.exit(f"error: --only {','.join(unknown)} is invalid: valid parts are {', '.join(PARTS)}")
    if args.worker:
        print(json.dumps(worker(args.only, args.size, args.peak_tflops, args.override, args.micro_batches, args.profile)))
        return
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        codes = {"current": REPO, **({"baseline": checkout(args.baseline, Path(tmp))} if args.baseline else {})}
        runs = {name: [] for name in codes}
        for _ in range(args.rounds):
            for name, code in codes.items():
                if name in failed:
                    continue
                run = measure(code, args)
                if isinstance(run, str):
                    failed[name] = run
                    print(f"bench_gpu: the {name} code failed in {code}:\n{run}", file=sys.stderr)
                    if name == "current":
                        sys.exit(f"error: the benchmark failed for the code in {code}")
                    continue
                runs[name].append(run)
                # At once on stderr, so that a run stopped later (a time limit) keeps what was measured.
                print(f"bench_gpu: {name} measured: {json.dumps(run)}", file=sys.stderr, flush=True)
    current = best_of(runs["current"])
    baseline = best_of(runs["baseline"]) if runs.get("baseline") else None

    def header(run: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in run["header"].items())

    print(f"bench_gpu: {header(current)}, parts={','.join(args.only)}")
    if baseline:
        print(f"bench_gpu_baseline: ref={args.baseline}, {header(baseline)}")
    elif "baseline" in failed:
        print(f"bench_gpu_baseline: ref={args.baseline}, failed (its error is on stderr)")
    for key, value in current["figures"].items():
        print(f"{key}: {shown(value)}")
        old = baseline["figures"].get(key) if baseline else None
        if old is not None:
            print(f"{key}_baseline: {shown(old)}")
            if not isinstance(old, str) and not isinstance(value, str) and old and value:
                print(f"{key}_vs_baseline: {ratio(key, value, old):.3g}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
