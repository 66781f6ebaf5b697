#!/bin/bash
# GPU machine: the decode kernels' tests, each kernel alone (sweep), the decode profile, and
# optionally the bench beside mlx-lm. Logs under $OUT. STAGES picks (default: all). The full suites
# then the bench: STAGES=suites SHARD=1/3 (2/3, 3/3: a call each), then STAGES=bench BENCH_TIMEOUT=560.
set -o pipefail
# The device runs this checkout uninstalled (PYTHONPATH=$PWD), where pyproject.toml's package-dir
# mapping (convert/ -> oss_mlx.convert, the kernel folders) does not apply: links do it (git-ignored).
for d in convert kernels_shared kernels_metal kernels_cuda; do [ -e oss_mlx/$d ] || ln -s ../$d oss_mlx/$d; done
STAGES=${STAGES:-tests sweep profile bench}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpu.txt
for stage in $STAGES; do
  echo "== $stage" | tee -a $OUT/run.log
  case $stage in
    tests) timeout ${TEST_TIMEOUT:-200} python3 -m pytest -v -rf --maxfail=30 tests/test_kernels.py \
             -k "${TESTK:-norm_qkv or out_residual or attention_block or few_ops or paths_are or self_test}" \
             > $OUT/tests.log 2>&1; grep -cE "PASSED" $OUT/tests.log; grep -E "FAILED|Error" $OUT/tests.log | head -30 || true ;;
    suites)  # the full kernel and decode suites, SHARD=i/n of them per call (each within a call's 10 minutes);
             # counts and failures to run.log, everything to suites-i-of-n.log / .xml
             part=${SHARD:-1/1}; tag=${part/\//-of-}
             timeout ${TEST_TIMEOUT:-570} python3 -m pytest -v -rfEs -p no:cacheprovider tests/test_kernels.py \
               tests/test_decode.py --shard $part --junitxml $OUT/suites-$tag.xml > $OUT/suites-$tag.log 2>&1
             echo "rc $? (124: cut by the timeout)" | tee -a $OUT/run.log
             tail -n 1 $OUT/suites-$tag.log | tee -a $OUT/run.log
             grep -E "^(FAILED|ERROR)" $OUT/suites-$tag.log | head -30 | tee -a $OUT/run.log || true ;;
    alltests) timeout ${TEST_TIMEOUT:-400} python3 -m pytest -v -rf --maxfail=40 tests/test_kernels.py tests/test_bench.py \
             > $OUT/alltests.log 2>&1; grep -cE "PASSED" $OUT/alltests.log; grep -E "FAILED|Error" $OUT/alltests.log | head -30 || true ;;
    streamtests)  # expert streaming on the GPU (bit-identical tokens; the converted case needs .device/vocab)
             export TIKTOKEN_CACHE_DIR=$PWD/.device/vocab TIKTOKEN_RS_CACHE_DIR=$PWD/.device/vocab
             timeout ${TEST_TIMEOUT:-200} python3 -m pytest -v -rf tests/test_streaming.py > $OUT/streamtests.log 2>&1
             grep -cE "PASSED" $OUT/streamtests.log; grep -E "FAILED|Error" $OUT/streamtests.log | head -20 || true ;;
    structured)  # decode with a JSON schema vs free, same run, 20b shapes (llguidance among the wheels:
             # prepare-mlx-cuda.sh llguidance; the vocabulary in .device/vocab)
             export TIKTOKEN_CACHE_DIR=$PWD/.device/vocab TIKTOKEN_RS_CACHE_DIR=$PWD/.device/vocab
             timeout ${STRUCTURED_TIMEOUT:-500} python3 benchmarks/structured_decode.py --config 20b \
               --decode-tokens 256 --repeat 3 --json $OUT/structured.json 2>&1 | tee -a $OUT/run.log ;;
    layers) timeout 300 python3 -m oss_mlx.cli bench --config 20b --prompt-lengths 128 --decode-tokens 4 \
              --engines oss-mlx --check-layers 300 --json $OUT/layers.json 2>&1 | tee -a $OUT/run.log ;;
    sweep) timeout 150 python3 benchmarks/profile_decode.py --layers 2 --sweep --json $OUT/sweep.json 2>&1 | tee -a $OUT/run.log ;;
    profile) timeout ${PROFILE_TIMEOUT:-200} python3 benchmarks/profile_decode.py --depths ${DEPTHS:-128,32768} \
             --json $OUT/profile.json 2>&1 | tee -a $OUT/run.log ;;
    probe) timeout ${PROBE_TIMEOUT:-200} python3 benchmarks/compile_probe.py --keys ${KEYS:-256} \
             --json $OUT/probe.json 2>&1 | tee -a $OUT/run.log ;;
    ncu) timeout ${NCU_TIMEOUT:-400} ncu --cache-control all --clock-control none -k regex:oss_ \
             --metrics gpu__time_duration.sum --csv python3 benchmarks/ncu_sweep.py > $OUT/ncu.csv 2> $OUT/ncu.err
         python3 benchmarks/ncu_sweep.py --summarize $OUT/ncu.csv | tee -a $OUT/run.log ;;
    steps)  # every kernel of real decode steps at each depth, timed on the card (step_kernels.py)
         for d in ${DEPTHS:-128 32768}; do
           timeout ${STEPS_TIMEOUT:-300} ncu --profile-from-start off --cache-control none --clock-control none \
             --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__registers_per_thread --csv \
             python3 benchmarks/step_kernels.py --depth $d --steps 2 --sampler ${SAMPLER:-ours} > $OUT/steps-$d.csv 2> $OUT/steps-$d.err
           echo "-- depth $d" | tee -a $OUT/run.log
           python3 benchmarks/step_kernels.py --summarize $OUT/steps-$d.csv --steps 2 | tee -a $OUT/run.log
         done ;;
    detail)  # Nsight Compute's full sections for one launch of each decode kernel (stalls, occupancy)
         timeout ${DETAIL_TIMEOUT:-300} ncu --set full --cache-control all --clock-control none -k regex:oss_ \
           --page details --csv python3 benchmarks/ncu_sweep.py --detail > $OUT/detail.csv 2> $OUT/detail.err
         wc -l $OUT/detail.csv | tee -a $OUT/run.log ;;
    source)  # per-SASS-instruction stall samples of one launch of the kernels in KREGEX (ncu_sweep --detail)
         timeout ${SOURCE_TIMEOUT:-200} ncu --set full --cache-control all --clock-control none \
           -k regex:"${KREGEX:-oss_norm_qkv}" --launch-count 1 --page source --print-source sass --csv \
           python3 benchmarks/ncu_sweep.py --detail > $OUT/source.csv 2> $OUT/source.err
         wc -l $OUT/source.csv | tee -a $OUT/run.log ;;
    moeprobe) timeout ${PROBE_TIMEOUT:-150} python3 benchmarks/prefill_moe_probe.py 2>&1 | tee -a $OUT/moeprobe.log ;;
    shapeprobe) timeout ${PROBE_TIMEOUT:-150} python3 benchmarks/first_shape_probe.py 2>&1 | tee -a $OUT/shapeprobe.log ;;
    order)  # why the after-128 decode row was low in session 7's runs (323-402 tok/s; after 2k 344-475; later 128s ~500)
            for w in 2100 0; do timeout ${BENCH_TIMEOUT:-200} python3 -m oss_mlx.cli bench --config 20b --prompt-lengths 128,128,2048,128 \
              --decode-tokens 64 --engines oss-mlx --warmup $w --json $OUT/order-warmup$w.json 2>&1 | tee -a $OUT/order.log; done ;;
    smallprobe) timeout 120 python3 benchmarks/small_array_probe.py 2>&1 | tee -a $OUT/run.log
         timeout 200 ncu --metrics gpu__time_duration.sum -k regex:probe --csv \
           python3 benchmarks/small_array_probe.py > $OUT/smallprobe.csv 2> $OUT/smallprobe.err
         python3 benchmarks/ncu_sweep.py --summarize $OUT/smallprobe.csv | tee -a $OUT/run.log ;;
    envs) for v in MLX_X=0 MLX_MAX_OPS_PER_BUFFER=50 MLX_MAX_OPS_PER_BUFFER=200 MLX_USE_CUDA_GRAPHS=0; do
            env $v timeout 100 python3 benchmarks/profile_decode.py --depths 128 2>&1 | tee -a $OUT/run.log
          done ;;
    bench120) timeout ${BENCH_TIMEOUT:-300} python3 -m oss_mlx.cli bench --config 120b \
             --prompt-lengths 8192,32768 --decode-tokens 8 --warmup 0 --engines oss-mlx ${STEP:+--prefill-step $STEP} \
             --json $OUT/bench120.json 2>&1 | tee $OUT/bench120.log ;;
    small20) for step in 2048 512; do
               timeout 150 python3 -m oss_mlx.cli bench --config 20b --quality small --prompt-lengths 8192 \
                 --decode-tokens 8 --warmup 0 --engines oss-mlx --prefill-step $step \
                 --json $OUT/small20-$step.json 2>&1 | tee -a $OUT/small20.log
             done ;;
    stream20)  # #7: a converted `small` 20b streamed under a budget, 8k prompt (carry .device/vocab)
             export TIKTOKEN_CACHE_DIR=$PWD/.device/vocab TIKTOKEN_RS_CACHE_DIR=$PWD/.device/vocab
             W=${SDIR:-/tmp/s20}; rm -rf $W
             # PYTHONPATH runs the tree uninstalled: give it the package's oss_mlx.convert (pyproject maps it)
             [ -e oss_mlx/convert ] || ln -s ../convert oss_mlx/convert
             ( time python3 -m oss_mlx.cli synthetic $W/src --config ${SCONF:-20b} --layout hf-mxfp4 ) 2>&1 | tail -4 | tee -a $OUT/stream20.log
             ( time python3 -m oss_mlx.cli convert $W/src $W/small --quality small ) 2>&1 | tail -6 | tee -a $OUT/stream20.log
             rm -rf $W/src; i=0
             for budget in ${BUDGETS:-6GB}; do
               for step in ${STEPS:-512}; do
                 i=$((i + 1))
                 timeout ${STREAM_TIMEOUT:-300} python3 -m oss_mlx.cli bench --model $W/small --memory-budget $budget \
                   --engines oss-mlx --prompt-lengths ${SLEN:-8192} --decode-tokens 8 --warmup 0 --prefill-step $step \
                   --json $OUT/stream20-$i.json 2>&1 | tee -a $OUT/stream20.log
               done
             done ;;
    envbench)  # host-bound decode: MLX-CUDA's graph settings (a commit every 100 ops or 1,000 M input
               # elements on H100/H200, device.cpp) against the default, oss-mlx alone, 128 and 32k
         i=0; for v in MLX_X=0 MLX_MAX_OPS_PER_BUFFER=400 "MLX_MAX_OPS_PER_BUFFER=400 MLX_MAX_MB_PER_BUFFER=1000000" \
                       MLX_USE_CUDA_GRAPHS=0; do
           i=$((i + 1)); echo "-- $v" | tee -a $OUT/envbench.log
           env $v timeout 150 python3 -m oss_mlx.cli bench --config 20b --prompt-lengths 128,32768 --decode-tokens 64 \
             --engines oss-mlx --json $OUT/envbench-$i.json 2>&1 | grep -E "context|device" | tee -a $OUT/envbench.log
         done ;;
    bench1) timeout ${BENCH_TIMEOUT:-400} python3 -m oss_mlx.cli bench --config 20b --prompt-lengths 128,2048,8192,32768 \
              --decode-tokens 32 --engines oss-mlx,mlx-lm --json $OUT/bench.json 2>&1 | tee -a $OUT/bench.log ;;
    benchrepeat)  # bench1 with each length run twice per engine, the second kept (session 6's runs I, J)
            timeout ${BENCH_TIMEOUT:-430} python3 -m oss_mlx.cli bench --config 20b --prompt-lengths 128,2048,8192,32768 \
              --decode-tokens 32 --engines oss-mlx,mlx-lm --repeat 2 --json $OUT/bench-repeat2.json 2>&1 \
              | tee -a $OUT/bench-repeat2.log ;;
    bench2) i=0; for v in MLX_X=0 MLX_USE_CUDA_GRAPHS=0; do  # (no '=' in file names: they would not come back)
              i=$((i + 1))
              env $v timeout 280 python3 -m oss_mlx.cli bench --config 20b --prompt-lengths 128,2048,8192,32768 \
                --decode-tokens 32 --engines oss-mlx,mlx-lm --json $OUT/bench-$i.json 2>&1 | tee -a $OUT/bench2.log
            done ;;
    firsttests)  # the fixed prefill shapes, the warm-up, the caches and the decode step on the card
             timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -rf -p no:cacheprovider tests/test_first_prompt.py \
               tests/test_cache.py tests/test_decode.py > $OUT/firsttests.log 2>&1
             echo "rc $?" | tee -a $OUT/run.log; tail -n 3 $OUT/firsttests.log | tee -a $OUT/run.log ;;
    cold)  # issue 22: each length and a chat's first message as a fresh process's first prompt (cold), then
           # again in it (warm); load apart. ENGINES=oss-mlx or mlx-lm: one call each (~3 min each)
           timeout ${BENCH_TIMEOUT:-570} python3 -m oss_mlx.cli bench --config ${CONFIG:-20b} --cold --ttft \
             --prompt-lengths ${LENGTHS:-128,2048,8192,32768} --decode-tokens 32 --engines ${ENGINES:-oss-mlx} \
             --json $OUT/cold-${ENGINES:-oss-mlx}.json 2>&1 | tee -a $OUT/cold.log ;;
    followup)  # issue 22: 2k new after 8k / 32k cached beside a fresh 2k prompt, and decode after 128 / 32k
           timeout ${BENCH_TIMEOUT:-480} python3 -m oss_mlx.cli bench --config 20b --prompt-lengths 128,32768 \
             --decode-tokens 64 --follow-up 8192,32768 --engines ${ENGINES:-oss-mlx,mlx-lm} \
             --json $OUT/followup.json 2>&1 | tee -a $OUT/followup.log ;;
    cold120)  # issue 22 (c): the 120b's first 8k prompt in a fresh process, without then with the load-time
              # warm-up (its report splits the one-time cost into kernel compiles and attention graphs)
           for w in off on; do
             timeout ${BENCH_TIMEOUT:-280} python3 -m oss_mlx.cli bench --config 120b --cold --prompt-lengths 8192 \
               --decode-tokens 8 --engines oss-mlx --load-warmup $w ${STEP:+--prefill-step $STEP} \
               --json $OUT/cold120-$w.json 2>&1 | tee -a $OUT/cold120.log
           done ;;
    coldbefore)  # the cold stage with the old behaviour (no fixed shapes, no load-time warm-up), oss-mlx only
           OSS_MLX_FIXED_SHAPES=0 timeout ${BENCH_TIMEOUT:-570} python3 -m oss_mlx.cli bench --config 20b --cold \
             --ttft --prompt-lengths ${LENGTHS:-128,2048,8192,32768} --decode-tokens 32 --engines oss-mlx \
             --load-warmup off --json $OUT/cold-before.json 2>&1 | tee -a $OUT/cold.log ;;
    bench) timeout ${BENCH_TIMEOUT:-300} python3 -m oss_mlx.cli bench --config 20b \
             --prompt-lengths ${LENGTHS:-128,2048,8192,32768} --decode-tokens 32 --engines oss-mlx,mlx-lm \
             --json $OUT/bench.json 2>&1 | tee $OUT/bench.log ;;
  esac
done
