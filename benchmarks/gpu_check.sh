#!/usr/bin/env bash
# The CUDA checks and speed figures in one go, for a GPU machine with little time:
# the CUDA tests, then the training-step benchmark (eager per precision, compiled bf16,
# and the memory/layout options), CLIP inference and GPU-side ranking.
#
#   bash benchmarks/gpu_check.sh [LOG_DIR]   # output also in LOG_DIR/gpu_check.log, profile in LOG_DIR
#
# Every step has its own time limit, so one slow step cannot take the others' time.
# About 8 minutes on an H200, most of it compiling (train_compiled, train_graphs).
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

step tests 100 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_metrics.py::test_cuda_matches_cpu
step train_eager 100 $PY -m benchmarks.bench_train_step --full --device cuda --precisions fp32 bf16 fp16 --check-syncs
step train_compiled 150 $PY -m benchmarks.bench_train_step --full --device cuda --precisions bf16 --compile on --check-syncs
step train_graphs 150 $PY -m benchmarks.bench_train_step --full --device cuda --precisions bf16 --compile on --compile-mode reduce-overhead
step train_b256 70 $PY -m benchmarks.bench_train_step --full --device cuda --precisions bf16 --batch-size 256 --steps 10 --warmup 3
step train_profile 80 $PY -m benchmarks.bench_train_step --full --device cuda --precisions bf16 --profile "$LOG_DIR"
step train_ckpt 55 $PY -m benchmarks.bench_train_step --full --device cuda --precisions bf16 --checkpointing --batch-size 128
step clip 30 $PY -m benchmarks.bench_clip --device cuda --amp bf16 --batch-size 256 --iters 10
step eval 40 $PY -m benchmarks.bench_eval --device cuda --skip-reference
