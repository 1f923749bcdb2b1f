"""Every benchmark in benchmarks/ runs at its smallest size and prints the `key: value` lines its readers
rely on, so that none rots unnoticed (bench_gpu above all: it is run unchanged on a GPU node).
bench_kernels is run by test_ibq_chunked.py, which asserts its figures."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from conftest import REPO, cli_env

pytestmark = pytest.mark.slow

LINE = re.compile(r"([A-Za-z0-9_]+): (\S.*)")
SECOND_PAIR = re.compile(r"\s{2,}[A-Za-z_]\w*: ")  # as in `torch_threads: 2  fid: 301.7`
SKIPPED = re.compile(r"skipped \(.+\)")
# README's "GPU figures": the names an open GPU issue reads. On CPU some are skipped with their reason.
GPU_FIGURES = ("tokenizer_step_images_per_s_mb4", "tokenizer_step_images_per_s_mb32", "tokenizer_step_peak_gib_mb32",
               "tokenizer_step_mfu_mb4", "ibq_chunked_over_dense_time_k262144", "ibq_chunked_peak_gib_k262144",
               "ibq_k1048576_over_k262144_time", "ar_sample_B_b32_tokens_per_s", "ar_kv_cache_speedup_B_b32",
               "ar_train_B_mfu", "ar_train_XL_mfu")


def run_benchmark(name: str, *args: str) -> dict[str, str]:
    """The benchmark's stdout as {key: value}; every line must be one `key: value` pair, each key once."""
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=cli_env())
    assert result.returncode == 0, f"{name} {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    lines = {}
    for line in result.stdout.splitlines():
        match = LINE.fullmatch(line)
        assert match and not SECOND_PAIR.search(line), f"{name} printed a line that is not one `key: value` pair: {line!r}"
        key, value = match.groups()
        assert key not in lines, f"{name} printed {key} twice"
        lines[key] = value
    return lines


def measured(lines: dict[str, str], key: str, minimum: float = 0.0, above: bool = True) -> float:
    """The finite number on the line `key`, checked to be above (or at least) `minimum`."""
    assert key in lines, f"no `{key}:` line in {sorted(lines)}"
    value = float(lines[key])
    assert math.isfinite(value) and (value > minimum if above else value >= minimum), f"{key}: {value}"
    return value


def measured_or_skipped(lines: dict[str, str], key: str) -> None:
    """A figure this machine may not give: a positive number or `skipped (<reason>)`."""
    assert key in lines, f"no `{key}:` line in {sorted(lines)}"
    if not SKIPPED.fullmatch(lines[key]):
        measured(lines, key)


def test_bench_gpu_prints_every_gpu_figure():
    lines = run_benchmark("bench_gpu")
    assert "sizes=tiny" in lines["bench_gpu"] or "sizes=real" in lines["bench_gpu"]
    for key in GPU_FIGURES:
        measured_or_skipped(lines, key)
    for key in ("tokenizer_step_images_per_s_mb4", "tokenizer_step_images_per_s_mb32", "tokenizer_step_first_s_mb4", "ibq_dense_ms_k262144",
                "ibq_chunked_ms_k262144", "ibq_chunked_over_dense_time_k262144", "ibq_k1048576_over_k262144_time",
                "ar_sample_B_b32_tokens_per_s", "ar_sample_B_b32_ms_per_step", "ar_kv_cache_speedup_B_b32",
                "ar_train_B_tokens_per_s", "ar_train_XL_tokens_per_s"):
        measured(lines, key)  # on every device


def test_bench_gpu_compares_with_a_baseline_folder():
    """The repository itself is a valid baseline folder: each figure gets its `_baseline` and a positive
    `_vs_baseline` ratio, measured in the same run."""
    lines = run_benchmark("bench_gpu", "--baseline", str(REPO), "--only", "ibq")
    assert lines["bench_gpu_baseline"].startswith(f"ref={REPO}, device=")
    figures = [key for key in lines if key.startswith("ibq_") and not key.endswith(("_baseline", "_vs_baseline"))]
    assert "ibq_chunked_over_dense_time_k262144" in figures
    for key in figures:
        if SKIPPED.fullmatch(lines[key]):
            assert lines[f"{key}_baseline"] == lines[key]
        else:
            measured(lines, f"{key}_baseline")
            measured(lines, f"{key}_vs_baseline")


def test_bench_gpu_keeps_the_figures_of_this_code_when_the_baseline_fails(tmp_path):
    """A GPU node's time is short: a baseline that cannot run loses none of this code's figures, which
    also reach stderr as each code is measured, and the exit status says that the comparison failed."""
    (tmp_path / "ibq").mkdir()
    (tmp_path / "ibq" / "__init__.py").write_text("raise ImportError('a baseline that cannot be imported')\n")
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", "--only", "ibq", "--baseline", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=cli_env())
    assert result.returncode == 1
    assert "a baseline that cannot be imported" in result.stderr and "bench_gpu: current measured: {" in result.stderr
    lines = dict(LINE.fullmatch(line).groups() for line in result.stdout.splitlines())
    assert lines["bench_gpu_baseline"] == f"ref={tmp_path}, failed (its error is on stderr)"
    measured(lines, "ibq_chunked_over_dense_time_k262144")
    assert not any(key.endswith(("_baseline", "_vs_baseline")) for key in lines if key != "bench_gpu_baseline")


def test_bench_gpu_profiles_the_measured_steps_on_stderr():
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", "--only", "ibq", "--profile", "5"], cwd=REPO,
                            capture_output=True, text=True, timeout=600, env=cli_env())
    assert result.returncode == 0, result.stderr[-3000:]
    profile = result.stderr.split("bench_gpu profile of ibq_chunked_k262144 (one call, by self_", 1)
    assert len(profile) == 2, result.stderr[-3000:]
    # Its 5 costliest operators: which ones, and in which order, depends on the load on the machine.
    rows = [line.split()[0] for line in profile[1].split("Self CPU time total")[0].splitlines() if "%" in line and "Name" not in line]
    assert len(rows) == 5 and any(name.startswith("aten::") for name in rows), profile[1][:2000]
    assert all(LINE.fullmatch(line) for line in result.stdout.splitlines())  # the figures' lines as without it


def test_the_gpu_check_script_runs_its_steps_and_keeps_their_logs(tmp_path):
    """scripts/gpu_check.sh (make gpu-check), as on a GPU node but with one bench_gpu part: without a CUDA
    device its tests are skipped and bench_gpu runs at its tiny sizes."""
    result = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=cli_env(PYTHON=sys.executable, PARTS="tests ibq", GPU_CHECK_S="300"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert {path.name for path in tmp_path.iterdir()} == {"env.txt", "cuda_tests.txt", "bench_ibq.txt"}
    tests = (tmp_path / "cuda_tests.txt").read_text()
    assert re.search(r"\d+ skipped", tests) and not re.search(r"failed|error", tests, re.IGNORECASE), tests[-2000:]
    ibq = dict(LINE.fullmatch(line).groups() for line in (tmp_path / "bench_ibq.txt").read_text().splitlines() if LINE.fullmatch(line))
    measured(ibq, "ibq_chunked_over_dense_time_k262144")
    assert "gpu_check: done in" in result.stdout


def test_the_gpu_check_compares_only_the_default_steps_with_the_baseline(tmp_path):
    """Which bench_gpu arguments each part of the GPU check passes (a stand-in python prints them): the
    variants of the tokenizer step run without the baseline, whose figures the main part measures."""
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/bin/sh\necho "args: $*"\n')
    stand_in.chmod(0o755)
    logs = tmp_path / "logs"
    result = subprocess.run(["bash", "scripts/gpu_check.sh", str(logs)], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env=cli_env(PYTHON=str(stand_in), PARTS="tokenizer tokenizer_graphs tokenizer_norms",
                                        BASELINE="ef75447", BENCH_ARGS="--profile 5"))
    assert result.returncode == 0, result.stderr

    def arguments(part: str) -> str:
        return (logs / f"bench_{part}.txt").read_text().strip().removeprefix("args: -m benchmarks.bench_gpu ")

    assert arguments("tokenizer") == "--baseline ef75447 --profile 5 --only tokenizer"
    assert arguments("tokenizer_graphs") == "--profile 5 --only tokenizer --micro-batches 4 --override=++train.compile=reduce-overhead"
    assert arguments("tokenizer_norms") == "--profile 5 --only tokenizer --micro-batches 32 --override=++train.activation_checkpointing=norms"


def test_bench_gpu_measures_the_micro_batches_asked_for():
    lines = run_benchmark("bench_gpu", "--only", "tokenizer", "--micro-batches", "4")
    measured(lines, "tokenizer_step_images_per_s_mb4")
    assert not any(key.endswith("mb32") for key in lines)


def test_bench_train():
    lines = run_benchmark("bench_train", "4")
    measured(lines, "tiny_train_images_per_s")
    assert 0 <= measured(lines, "tiny_train_data_wait_share", above=False) <= 1


def test_bench_ddp():
    """Two ranks of the tiny tokenizer, with the repository itself as the baseline folder."""
    lines = run_benchmark("bench_ddp", "--scale", "tiny", "--steps", "1", "--baseline", str(REPO))
    assert "ranks=2, model_scale=tiny" in lines["bench_ddp"]
    measured(lines, "ddp_tokenizer_gradient_gib")
    for key in ("ddp_tokenizer_peak_gib", "ddp_tokenizer_step_s"):
        for figure in (key, f"{key}_baseline", f"{key}_vs_baseline"):
            measured(lines, figure)


def test_bench_fid():
    lines = run_benchmark("bench_fid", "--samples", "512", "--dim", "256", "--repeats", "1", "--eval-images", "16")
    for key in ("torch_threads", "fid", "frechet_distance_256_seconds", "tiny_eval_s_real_stats_computed",
                "tiny_eval_s_real_stats_cached", "tiny_eval_cached_speedup"):
        measured(lines, key)
    assert lines["tiny_eval_images"] == "16"


def test_bench_quantizers():
    lines = run_benchmark("bench_quantizers", "--size", "tiny")
    assert lines["peak_rss_reset"] in ("yes", "no (/proc/self/clear_refs not writable: peaks include the setup)")
    for key in ("ibq_chunked_fwd_bwd_ms_k4096", "ibq_dense_fwd_bwd_ms_k4096", "ibq_chunked_fwd_bwd_ms_k16384",
                "ibq_chunked_peak_memory_ratio", "ibq_chunked_time_ratio"):
        measured(lines, key)
    for key in ("ibq_chunked_peak_mib_k4096", "ibq_dense_peak_mib_k4096", "ibq_chunked_peak_mib_k16384",
                "ibq_chunked_process_peak_mib_k16384"):
        measured(lines, key, above=False)
    for quantizer in ("ibq_dense", "ibq_chunked", "vq", "ema_vq", "l2_vq", "simvq", "lfq", "fsq"):
        measured(lines, f"{quantizer}_fwd_bwd_ms_k1024")
        measured(lines, f"{quantizer}_peak_mib_k1024", above=False)


def test_bench_sampling():
    lines = run_benchmark("bench_sampling", "--batch", "1", "--tokens", "2", "--speedup-tokens", "16")
    assert lines["device"] in ("cpu", "cuda")
    for key in ("tiny_16_tokens_cached_s", "tiny_16_tokens_uncached_s", "ar_kv_cache_speedup", "ar_tokens_per_s_tiny"):
        measured(lines, key)
    for scale in ("B", "L", "XL", "XXL"):
        measured_or_skipped(lines, f"ar_tokens_per_s_{scale}")


def test_bench_data():
    lines = run_benchmark("bench_data", "48", "1", "4")  # 48 JPEGs, 1 loader worker, 4 training steps
    for key in ("loader_folder_images_per_s", "loader_shards_images_per_s", "loader_shards_over_folder",
                "tiny_train_from_shards_images_per_s"):
        measured(lines, key)
    assert 0 <= measured(lines, "tiny_train_from_shards_data_wait_share", above=False) <= 1


def test_bench_sweeps():
    lines = run_benchmark("bench_sweeps")
    assert lines["jobs"] == "64"
    measured(lines, "plan_wall_s")
    measured(lines, "plan_cpu_s")
    measured(lines, "load_average_1min", above=False)


def test_bench_gpu_ratios_are_above_one_when_the_new_code_is_better():
    """Times, memory and time ratios improve when they shrink, whatever size their name ends in; the best
    of several rounds is their smallest value."""
    from benchmarks.bench_gpu import best_of, ratio

    for key in ("ibq_chunked_over_dense_time_k262144", "ibq_chunked_peak_gib_k262144", "tokenizer_step_peak_gib_mb32",
                "ibq_k1048576_over_k262144_time", "ar_sample_B_b32_ms_per_step", "ibq_dense_ms_k262144"):
        assert ratio(key, 1.0, 2.0) == 2.0, key
    for key in ("tokenizer_step_images_per_s_mb4", "ar_kv_cache_speedup_B_b32", "ar_train_B_mfu", "ar_sample_B_b32_tokens_per_s"):
        assert ratio(key, 1.0, 2.0) == 0.5, key
    rounds = [{"header": {}, "figures": {"tokenizer_step_peak_gib_mb32": 3.0, "tokenizer_step_images_per_s_mb4": 1.0}},
              {"header": {}, "figures": {"tokenizer_step_peak_gib_mb32": 2.0, "tokenizer_step_images_per_s_mb4": 5.0}}]
    assert best_of(rounds)["figures"] == {"tokenizer_step_peak_gib_mb32": 2.0, "tokenizer_step_images_per_s_mb4": 5.0}
