#!/usr/bin/env bash
# The CUDA checks and speed figures in one go, for a GPU machine with little time.
# First what matters most: the CUDA tests (those that compile in a step of their own),
# then the candidates for the MFU target (compiled bf16 steps with CUDA graphs, batch 64
# and 256) and the eager bf16 step.
# With ALL=1 it goes on with the rest: eager fp32/fp16, compiled without CUDA graphs,
# eager batch 256, a profile, gradient checkpointing, CLIP inference, GPU ranking.
#
#   bash benchmarks/gpu_check.sh [LOG_DIR]         # at most 9.5 minutes (the steps' limits)
#   ALL=1 bash benchmarks/gpu_check.sh [LOG_DIR]   # at most 21 minutes
#
# Output also goes to LOG_DIR/gpu_check.log (profile files in LOG_DIR). Every step has
# its own time limit, so one slow step cannot take the others' time; compiling the
# ViT-B/16 step takes about 2 minutes.
set -u
LOG_DIR=${1:-gpu_check_logs}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG_DIR/gpu_check.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$LOG_DIR/gpu_check.log"
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"

step tests 80 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_metrics.py::test_cuda_matches_cpu -k "not compiled and not cuda_graphs"
step compile_tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "compiled or cuda_graphs"
step graphs_b64 140 $PY -m benchmarks.bench_train_step --full --device cuda --precisions bf16 --compile on --compile-mode reduce-overhead
step graphs_b256 150 $PY -m benchmarks.bench_train_step --full --device cuda --precisions bf16 --compile on --compile-mode reduce-overhead --batch-size 256 --steps 10 --warmup 5
step eager_b64 45 $PY -m benchmarks.bench_train_step --full --device cuda --precisions bf16 --check-syncs
[ "${ALL:-0}" = 1 ] || exit 0
step eager_fp32_fp16 80 $PY -m benchmarks.bench_train_step --full --device cuda --precisions fp32 fp16 --check-syncs
step compiled_b64 150 $PY -m benchmarks.bench_train_step --full --device cuda --precisions bf16 --compile on --check-syncs
step compiled_b256 170 $PY -m benchmarks.bench_train_step --full --device cuda --precisions bf16 --compile on --batch-size 256 --steps 10 --warmup 5
step eager_b256 70 $PY -m benchmarks.bench_train_step --full --device cuda --precisions bf16 --batch-size 256 --steps 10 --warmup 3
step profile 80 $PY -m benchmarks.bench_train_step --full --device cuda --precisions bf16 --profile "$LOG_DIR"
step checkpointing 55 $PY -m benchmarks.bench_train_step --full --device cuda --precisions bf16 --checkpointing --batch-size 128
step clip 30 $PY -m benchmarks.bench_clip --device cuda --amp bf16 --batch-size 256 --iters 10
step eval 40 $PY -m benchmarks.bench_eval --device cuda --skip-reference
