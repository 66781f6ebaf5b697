#!/bin/bash
# GPU machine with 2 GPUs (kind nvidia-h200-x2): the distributed modes on MLX's NCCL backend against
# one GPU, the same random weights (benchmarks/distributed_bench.py). Per model size in STAGES
# (default "20b 120b"): one GPU, then each of MODES (default "pipeline tensor") on 2 GPUs under
# mlx.launch, then the comparison. Logs and JSON under $OUT.
set -o pipefail
for d in convert kernels_metal kernels_cuda; do [ -e oss_mlx/$d ] || ln -s ../$d oss_mlx/$d; done
export PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0
STAGES=${STAGES:-20b 120b}
MODES=${MODES:-pipeline tensor}
LENGTHS=${LENGTHS:-128,2048,32768}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import mlx.core as mx; print('mlx', mx.__version__)" | tee -a $OUT/gpu.txt
python3 -c "import ctypes; v = ctypes.c_int(); ctypes.CDLL('libnccl.so.2').ncclGetVersion(ctypes.byref(v)); print('nccl', v.value)" \
  2>/dev/null | tee -a $OUT/gpu.txt
for size in $STAGES; do
  echo "== $size single GPU" | tee -a $OUT/run.log
  CUDA_VISIBLE_DEVICES=0 timeout ${SINGLE_TIMEOUT:-600} python3 benchmarks/distributed_bench.py --config $size \
    --distributed single --prompt-lengths $LENGTHS --json $OUT/$size-single.json 2>&1 | tee -a $OUT/run.log
  runs=()
  for mode in $MODES; do
    echo "== $size $mode, 2 GPUs, NCCL" | tee -a $OUT/run.log
    timeout ${DIST_TIMEOUT:-600} mlx.launch --backend nccl -n 2 --env NCCL_NVLS_ENABLE=0 --env PYTHONPATH=$PWD -- \
      python3 benchmarks/distributed_bench.py --config $size --distributed $mode --prompt-lengths $LENGTHS \
      --json $OUT/$size-$mode.json 2>&1 | tee -a $OUT/run.log
    [ -f $OUT/$size-$mode.json ] && runs+=($OUT/$size-$mode.json)
  done
  [ ${#runs[@]} -gt 0 ] && python3 benchmarks/distributed_bench.py --compare $OUT/$size-single.json "${runs[@]}" \
    | tee -a $OUT/run.log
done
