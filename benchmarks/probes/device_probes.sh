#!/bin/bash
# GPU machine: the one-question probes (benchmarks/probes/README.md says which question each answers).
# Logs under $OUT; STAGES picks, no default. Bench rows are appended to $RESULTS as in
# benchmarks/device_profile.sh. DRY_RUN=1 prints the commands instead of running them.
#   STAGES="order envbench" bash benchmarks/probes/device_probes.sh
set -o pipefail
OUT=${OUT:-./bench-out}
RESULTS=${RESULTS:-$OUT/results.jsonl}
mkdir -p "$OUT"
if [ -n "$DRY_RUN" ]; then
  timeout() { shift; "$@"; }
  for tool in python3 ncu; do eval "$tool() { echo \"+ $tool \$*\"; }"; done
fi
for d in convert kernels_shared kernels_metal kernels_cuda; do [ -e oss_mlx/$d ] || ln -s ../$d oss_mlx/$d; done
# The commit the rows name: the device's copy of the tree carries stale git metadata, so the commit
# travels as a file (here: git rev-parse HEAD > .device/b/COMMIT before the run; oss_mlx/bench_results.py).
[ -z "$OSS_MLX_COMMIT" ] && [ -f .device/b/COMMIT ] && export OSS_MLX_COMMIT=$(cat .device/b/COMMIT)
[ -n "$STAGES" ] || { echo "STAGES: one or more of order envbench cold120 greedy noise groupedmoe batchstep kernelcache moeprobe shapeprobe smallprobe compile loadchecks followattn timeline hostab"; exit 2; }
for stage in ${STAGES//,/ }; do  # spaces or commas between stages
  echo "== $stage" | tee -a $OUT/run.log
  case $stage in
    order)  # is the first length after the warm-up slow whatever its context? (128 twice first, with and without the warm-up)
      for w in 2100 0; do
        timeout ${BENCH_TIMEOUT:-200} python3 -m oss_mlx.cli bench --config 20b --prompt-lengths 128,128,2048,128 \
          --decode-tokens 64 --engines oss-mlx --warmup $w --results $RESULTS --json $OUT/order-warmup$w.json 2>&1 \
          | tee -a $OUT/order.log
      done ;;
    envbench)  # host-bound decode: MLX-CUDA's graph settings (a commit every 100 ops or 1,000 M input
               # elements on H100/H200, device.cpp) against the default, oss-mlx alone, 128 and 32k
      i=0
      for v in MLX_X=0 MLX_MAX_OPS_PER_BUFFER=400 "MLX_MAX_OPS_PER_BUFFER=400 MLX_MAX_MB_PER_BUFFER=1000000" \
               MLX_USE_CUDA_GRAPHS=0; do
        i=$((i + 1)); echo "-- $v" | tee -a $OUT/envbench.log
        ( export $v; timeout 150 python3 -m oss_mlx.cli bench --config 20b --prompt-lengths 128,32768 --decode-tokens 64 \
            --engines oss-mlx --results $RESULTS --json $OUT/envbench-$i.json ) 2>&1 | grep -E "context|device|\+ " \
          | tee -a $OUT/envbench.log
      done ;;
    cold120)  # the 120b's first 8k prompt (it ran at 302 tok/s) in a fresh process, then again: cold vs warm;
              # its warm-up report splits the cost (the dummy prompt's kernel compiles, the attention
              # graphs). WARMUPS="off on" adds the run without the warm-up; STEP=512: a memory-tight load's chunks
      for w in ${WARMUPS:-on}; do
        timeout ${BENCH_TIMEOUT:-280} python3 -m oss_mlx.cli bench --config 120b --cold --prompt-lengths 8192 \
          --decode-tokens 8 --engines oss-mlx --load-warmup $w ${STEP:+--prefill-step $STEP} --cold-timeout 260 \
          --results $RESULTS --json $OUT/cold120-$w.json 2>&1 | tee -a $OUT/cold120.log
      done ;;
    timeline)  # card- or host-bound decode? host time in async_eval, the card's busy / idle time a token
               # (CUPTI through torch.profiler), each kernel's warm duration; Chrome traces gzipped under $OUT
      (command -v nsys || echo "no nsys") | tee -a $OUT/timeline.log
      timeout ${PROBE_TIMEOUT:-300} python3 benchmarks/probes/decode_timeline_probe.py ${CONTEXTS:+--contexts $CONTEXTS} \
        --json $OUT/timeline.json --trace-dir $OUT 2>&1 | tee -a $OUT/timeline.log
      gzip -f $OUT/decode-*.json 2>/dev/null ;;
    hostab)  # the kernels' helpers as included files or inline (OSS_MLX_HEADER_FILES), a process each,
             # alternating twice; then the card tests of down_mma_combine and MOE_MMA_ISSUE (20b shapes)
      for r in 1 2; do for v in 1 0; do
        echo "-- OSS_MLX_HEADER_FILES=$v" | tee -a $OUT/hostab.log
        OSS_MLX_HEADER_FILES=$v timeout ${BENCH_TIMEOUT:-90} python3 -m oss_mlx.cli bench --config 20b \
          --prompt-lengths 128,32768 --decode-tokens 64 --engines oss-mlx --results $RESULTS 2>&1 \
          | grep -E "decode|disabled" | tee -a $OUT/hostab.log
      done; done
      timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q tests/test_kernels.py \
        -k "matrix_units or issue_setting or batched_decode_step" 2>&1 | tail -5 | tee -a $OUT/hostab.log ;;
    greedy)  # does the two-stage greedy argmax speed decode up on the card? (alternating rounds, 128 and 32k)
      timeout ${PROBE_TIMEOUT:-300} python3 benchmarks/probes/greedy_probe.py 2>&1 | tee -a $OUT/greedy.log ;;
    noise) timeout ${PROBE_TIMEOUT:-300} python3 benchmarks/probes/decode_noise_probe.py 2>&1 | tee -a $OUT/noise.log ;;
    groupedmoe)  # the decode MoE at 1-32 streams: per-slot vs the GEMM, the mma kernels at each RT and the
                 # grouped kernels at each COLS / RW (issue 19; COLS= : the grouped kernels not run)
      timeout ${PROBE_TIMEOUT:-240} python3 benchmarks/probes/grouped_moe_probe.py ${ROWS:+--rows $ROWS} \
        ${RT:+--rt $RT} ${COLS+--cols "$COLS"} 2>&1 \
        | tee -a $OUT/groupedmoe.log ;;
    batchstep)  # a decode batch's step at 1-16 rows, the attention's projections fused or in MLX's matmuls
      timeout ${PROBE_TIMEOUT:-240} python3 benchmarks/probes/batch_step_probe.py ${ROWS:+--rows $ROWS} 2>&1 \
        | tee -a $OUT/batchstep.log ;;
    kernelcache)  # does MLX read the cache of our CUDA kernels oss-mlx writes (OSS_MLX_KERNEL_CACHE=1)?
                  # MLX's printed sources against ours, then two fresh processes' first prompts timed
      timeout ${PROBE_TIMEOUT:-300} python3 benchmarks/probes/kernel_cache_probe.py 2>&1 | tee -a $OUT/kernelcache.log ;;
    moeprobe) timeout ${PROBE_TIMEOUT:-150} python3 benchmarks/probes/prefill_moe_probe.py 2>&1 | tee -a $OUT/moeprobe.log ;;
    shapeprobe) timeout ${PROBE_TIMEOUT:-150} python3 benchmarks/probes/first_shape_probe.py 2>&1 | tee -a $OUT/shapeprobe.log ;;
    smallprobe)
      timeout 120 python3 benchmarks/probes/small_array_probe.py 2>&1 | tee -a $OUT/run.log
      timeout 200 ncu --metrics gpu__time_duration.sum -k regex:probe --csv \
        python3 benchmarks/probes/small_array_probe.py > $OUT/smallprobe.csv 2> $OUT/smallprobe.err
      python3 benchmarks/ncu_sweep.py --summarize $OUT/smallprobe.csv | tee -a $OUT/run.log ;;
    compile) timeout ${PROBE_TIMEOUT:-200} python3 benchmarks/probes/compile_probe.py --keys ${KEYS:-256} \
               --json $OUT/compile-probe.json 2>&1 | tee -a $OUT/run.log ;;
    followattn)  # a 2k follow-up's full-layer attention after 32k cached: MLX's fused attention per form, TFLOP/s
      timeout ${PROBE_TIMEOUT:-150} python3 benchmarks/probes/followup_attention_probe.py 2>&1 | tee -a $OUT/followattn.log ;;
    loadchecks) timeout ${PROBE_TIMEOUT:-200} python3 benchmarks/probes/load_checks_probe.py 2>&1 | tee -a $OUT/loadchecks.log ;;
    *) echo "unknown stage $stage" | tee -a $OUT/run.log; exit 2 ;;
  esac
done
