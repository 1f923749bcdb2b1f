#!/usr/bin/env bash
# The checks of a GPU node, from the repository root: the CUDA-only tests (pytest -m cuda), then
# benchmarks/bench_gpu.py part by part, each within what is left of GPU_CHECK_S seconds, so that a node
# lent for a short time returns whatever finished. Writes one log per step into the folder given (default
# gpu-check/) and prints them as they run. PARTS picks steps (the tests are the part `tests`), in its order.
#   bash scripts/gpu_check.sh [folder]          BASELINE=<git ref or folder> compares with older code
#   GPU_CHECK_S=540 PARTS="ibq ar_sample" BENCH_ARGS="--profile 25" bash scripts/gpu_check.sh
set -o pipefail
out="${1:-gpu-check}"
mkdir -p "$out"
python="${PYTHON:-python3}"
start=$SECONDS
budget=${GPU_CHECK_S:-540}
# Seconds for a step: its cap, or what is left of the budget when that is less.
left() { local rest=$((budget - (SECONDS - start))); echo $((rest < $1 ? rest : $1)); }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.is_available() and torch.cuda.get_device_name())"
  "$python" -c "import triton; print('triton', triton.__version__)" 2>&1; } | tee "$out/env.txt"

# name, cap in seconds, bench_gpu's arguments; side by side with BASELINE when given (compared=false: the
# current code only, for variants of a step whose baseline figure another part measures)
bench() {
  local name=$1 seconds
  seconds=$(left "$2")
  shift 2
  if [ "$seconds" -le 20 ]; then
    echo "gpu_check: $name skipped, the budget is spent" | tee "$out/bench_$name.txt"
    return
  fi
  echo "gpu_check: $name, at most ${seconds}s, started at $((SECONDS - start))s"
  local baseline=()
  if [ -n "${BASELINE:-}" ] && [ "${compared:-true}" = true ]; then baseline=(--baseline "$BASELINE"); fi
  # shellcheck disable=SC2086  # BENCH_ARGS: several arguments
  timeout "$seconds" "$python" -m benchmarks.bench_gpu "${baseline[@]}" $BENCH_ARGS "$@" 2>&1 | tee "$out/bench_$name.txt"
}
for part in ${PARTS:-tests ibq ar_sample tokenizer tokenizer_graphs tokenizer_norms ar_train tokenizer_eager}; do
  case $part in
    tests) timeout "$(left 240)" "$python" -m pytest -m cuda -v -p no:cacheprovider -rs --durations=10 --continue-on-collection-errors tests 2>&1 | tee "$out/cuda_tests.txt" ;;
    tokenizer) bench "$part" 400 --only tokenizer ;;
    # the compiled step replayed as CUDA graphs, at the micro-batch where launching kernels costs most
    tokenizer_graphs) compared=false bench "$part" 200 --only tokenizer --micro-batches 4 --override=++train.compile=reduce-overhead ;;
    # compiled, GroupNorm + SiLU recomputed in the backward pass: the memory at micro-batch 32
    tokenizer_norms) compared=false bench "$part" 250 --only tokenizer --micro-batches 32 --override=++train.activation_checkpointing=norms ;;
    tokenizer_eager) bench "$part" 150 --only tokenizer --override=++train.compile=false ;;
    ar_sample) bench "$part" 240 --only "$part" ;;  # compiles a graph for each of 4 attention lengths
    *) bench "$part" 150 --only "$part" ;;
  esac
done
echo "gpu_check: done in $((SECONDS - start))s; logs in $out/"
