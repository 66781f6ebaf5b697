#!/bin/bash
# The distributed modes on GPUs against one GPU, the same random weights (benchmarks/distributed_bench.py).
# Per model size in STAGES (default "20b 120b"): one GPU, then each of MODES (default "pipeline tensor")
# over 2 ranks under mlx.launch, then the comparison (greedy tokens, tok/s, peak memory per rank).
#   BACKEND=nccl (default): 2 GPUs (kind nvidia-h200-x2), MLX's NCCL backend, NVLink multicast off.
#   BACKEND=ring: both ranks on ONE GPU, MLX's ring backend on 127.0.0.1 (its collectives run on the
#                 CPU): the sharded model on the CUDA kernels with real collectives, not NCCL.
# LENGTHS: prompt lengths (prefill at each, decode after each); BENCH_ARGS: more arguments for
# distributed_bench.py (a CPU check of this script: STAGES=tiny BENCH_ARGS="--num-layers 6"). Logs and JSON under $OUT; every
# measurement is appended to $OUT/results.jsonl (rows for benchmarks/results/h200.jsonl).
set -o pipefail
for d in convert kernels_shared kernels_metal kernels_cuda; do [ -e oss_mlx/$d ] || ln -s ../$d oss_mlx/$d; done
export PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0
STAGES=${STAGES:-20b 120b}
MODES=${MODES:-pipeline tensor}
LENGTHS=${LENGTHS:-128,2048,32768}
BACKEND=${BACKEND:-nccl}
RESULTS=${RESULTS:-$OUT/results.jsonl}
run() { echo "+ $*" | tee -a $OUT/run.log; [ -n "$DRY_RUN" ] || "$@" 2>&1 | tee -a $OUT/run.log; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import mlx.core as mx; print('mlx', mx.__version__)" | tee -a $OUT/gpu.txt
python3 -c "import ctypes; v = ctypes.c_int(); ctypes.CDLL('libnccl.so.2').ncclGetVersion(ctypes.byref(v)); print('nccl', v.value)" \
  2>/dev/null | tee -a $OUT/gpu.txt
if [ "$BACKEND" = nccl ]; then
  LAUNCH=(mlx.launch --backend nccl -n 2 --env NCCL_NVLS_ENABLE=0 --env PYTHONPATH=$PWD)
else  # one GPU: both ranks see GPU 0
  LAUNCH=(env CUDA_VISIBLE_DEVICES=0 mlx.launch --backend ring -n 2 --env PYTHONPATH=$PWD)
fi
for size in $STAGES; do
  echo "== $size single GPU" | tee -a $OUT/run.log
  run env CUDA_VISIBLE_DEVICES=0 timeout ${SINGLE_TIMEOUT:-600} python3 benchmarks/distributed_bench.py \
    --config $size --distributed single --prompt-lengths $LENGTHS --json $OUT/$size-single.json --results $RESULTS $BENCH_ARGS
  runs=()
  for mode in $MODES; do
    echo "== $size $mode, 2 ranks, $BACKEND" | tee -a $OUT/run.log
    run timeout ${DIST_TIMEOUT:-600} "${LAUNCH[@]}" -- python3 benchmarks/distributed_bench.py --config $size \
      --distributed $mode --prompt-lengths $LENGTHS --json $OUT/$size-$mode-$BACKEND.json --results $RESULTS $BENCH_ARGS
    [ -f $OUT/$size-$mode-$BACKEND.json ] && runs+=($OUT/$size-$mode-$BACKEND.json)
  done
  [ ${#runs[@]} -gt 0 ] && run python3 benchmarks/distributed_bench.py --compare $OUT/$size-single.json "${runs[@]}"
done
