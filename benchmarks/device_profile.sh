#!/bin/bash
# GPU machine: the kernel and decode test suites, each decode kernel alone (sweep, Nsight Compute),
# the decode profile, and the bench beside mlx-lm. Logs under $OUT; STAGES picks (default below).
#   STAGES=suites SHARD=1/3 bash benchmarks/device_profile.sh   # then 2/3, 3/3: one call each
#   STAGES=bench BENCH_TIMEOUT=560 bash benchmarks/device_profile.sh
#   STAGES=firsttests,cold,followup bash benchmarks/device_profile.sh   # the first prompt (issue 22)
# Bench rows are appended to $RESULTS (default $OUT/results.jsonl, one JSON row per measurement with
# date, device, versions, command and commit): append that file to benchmarks/results/h200.jsonl.
# DRY_RUN=1 prints every command a stage would run instead of running it (no GPU needed).
# One-question probes (a past or open question each): benchmarks/probes/device_probes.sh.
set -o pipefail
OUT=${OUT:-./bench-out}
RESULTS=${RESULTS:-$OUT/results.jsonl}
mkdir -p "$OUT"
if [ -n "$DRY_RUN" ]; then  # the commands, not their work (each tool named by what it would run)
  timeout() { shift; "$@"; }
  for tool in python3 ncu nvidia-smi; do eval "$tool() { echo \"+ $tool \$*\"; }"; done
fi
# The device runs this checkout uninstalled (PYTHONPATH=$PWD), where pyproject.toml's package-dir
# mapping (convert/ -> oss_mlx.convert, the kernel folders) does not apply: links do it (git-ignored).
for d in convert kernels_shared kernels_metal kernels_cuda; do [ -e oss_mlx/$d ] || ln -s ../$d oss_mlx/$d; done
# The commit the rows name: the device's copy of the tree carries stale git metadata, so the commit
# travels as a file (here: git rev-parse HEAD > .device/b/COMMIT before the run; oss_mlx/bench_results.py).
[ -z "$OSS_MLX_COMMIT" ] && [ -f .device/b/COMMIT ] && export OSS_MLX_COMMIT=$(cat .device/b/COMMIT)
STAGES=${STAGES:-tests sweep profile bench}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpu.txt
for stage in ${STAGES//,/ }; do  # spaces or commas between stages
  echo "== $stage" | tee -a $OUT/run.log
  case $stage in
    tests)  # a selection of the kernel tests (TESTK), quick
      timeout ${TEST_TIMEOUT:-200} python3 -m pytest -v -rf --maxfail=30 tests/test_kernels.py \
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
    alltests)  # the kernel and bench tests in one call (cut by its limit: suites is the complete run)
      timeout ${TEST_TIMEOUT:-400} python3 -m pytest -v -rf --maxfail=40 tests/test_kernels.py tests/test_bench.py \
        > $OUT/alltests.log 2>&1; grep -cE "PASSED" $OUT/alltests.log; grep -E "FAILED|Error" $OUT/alltests.log | head -30 || true ;;
    streamtests)  # expert streaming on the GPU (bit-identical tokens; the converted case needs .device/vocab)
      export TIKTOKEN_CACHE_DIR=$PWD/.device/vocab TIKTOKEN_RS_CACHE_DIR=$PWD/.device/vocab
      timeout ${TEST_TIMEOUT:-200} python3 -m pytest -v -rf tests/test_streaming.py > $OUT/streamtests.log 2>&1
      grep -cE "PASSED" $OUT/streamtests.log; grep -E "FAILED|Error" $OUT/streamtests.log | head -20 || true ;;
    structured)  # decode with a JSON schema vs free, same run, 20b shapes (llguidance among the wheels:
                 # prepare-mlx-cuda.sh llguidance; the vocabulary in .device/vocab; docs/PERFORMANCE.md)
      export TIKTOKEN_CACHE_DIR=$PWD/.device/vocab TIKTOKEN_RS_CACHE_DIR=$PWD/.device/vocab
      timeout ${STRUCTURED_TIMEOUT:-500} python3 benchmarks/structured_decode.py --config 20b \
        --decode-tokens 256 --repeat 3 --results $RESULTS --json $OUT/structured.json 2>&1 | tee -a $OUT/run.log ;;
    concurrency)  # streams decoding together at 20b shapes, oss-mlx's scheduler beside mlx-lm's BatchGenerator
                  # (docs/PERFORMANCE.md, Concurrency): aggregate and per-stream tok/s, TTFT beside running streams
      timeout ${CONCURRENCY_TIMEOUT:-450} python3 -m oss_mlx.cli bench --config 20b --concurrency 1,4,8,16 \
        --prompt-lengths 128 --decode-tokens 64 --results $RESULTS --json $OUT/concurrency.json 2>&1 | tee -a $OUT/run.log ;;
    batchtests)  # continuous batching on the card: the scheduler's tests (float32: batched tokens equal each
                 # alone) and the decode kernels with rows at their own positions, grouped vs per-slot MoE
      timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -rf -p no:cacheprovider tests/test_batching.py \
        tests/test_decode.py tests/test_kernels.py -k "batch or rows or grouped or moe_decode or few_ops" \
        > $OUT/batchtests.log 2>&1
      echo "rc $?" | tee -a $OUT/run.log; tail -n 3 $OUT/batchtests.log | tee -a $OUT/run.log ;;
    batchdecode)  # benchmarks/batch_decode.py at 20b shapes: the bytes-per-step prediction, TTFT beside 7
                  # streams, the decode MoE's ways, bf16 greedy equality, mlx-lm's BatchGenerator (SKIP_MLX_LM=1: not;
                  # MMA_FROM=n: the matrix-unit decode MoE from n rows, 0 off)
      timeout ${BATCHDECODE_TIMEOUT:-450} python3 benchmarks/batch_decode.py --config 20b ${SKIP_MLX_LM:+--skip-mlx-lm} \
        ${MMA_FROM:+--mma-from $MMA_FROM} \
        --results $RESULTS --json $OUT/batch_decode.json 2>&1 | tee -a $OUT/run.log ;;
    finetune)  # LoRA training at 20b shapes (docs/FINETUNE.md): MXFP4 base, rank 8 on attention + experts,
               # 2048 tokens, batch 1; checkpointing on, then off; peak memory and tok/s beside the plan
      timeout ${FINETUNE_TIMEOUT:-290} python3 benchmarks/finetune_bench.py --config 20b --length 2048 --batch 1 \
        --rank 8 --warmup 1 --steps 3 --checkpointing ${CHECKPOINTING:-on,off} --results $RESULTS --json $OUT/finetune.json 2>&1 | tee -a $OUT/run.log ;;
    ftmemory)  # where a training step's memory goes on the card: finetune_bench.py at 20b shapes over layer
               # counts, lengths, LoRA targets and a small vocabulary (the loss apart), checkpointing on and off
      for spec in ${FT_GRID:-"2 1024 attention" "2 2048 attention" "2 1024 attention,experts" \
          "2 2048 attention,experts" "4 2048 attention,experts" "2 2048 attention,experts 8192"}; do
        set -- $spec
        timeout ${FT_TIMEOUT:-240} python3 benchmarks/finetune_bench.py --config 20b --num-layers $1 --length $2 \
          --targets $3 ${4:+--vocab-size $4} --warmup 1 --steps 1 --checkpointing on,off --results $RESULTS \
          2>&1 | grep -E "checkpointing|rror" | sed "s/^/[$1 layers, vocab ${4:-full}, $3] /" | tee -a $OUT/run.log
      done ;;
    ftphases)  # a training step's peak per evaluation (forward blocks, the loss, backward blocks, the
               # optimizer) at 20b shapes, 2,048 tokens, checkpointing on (FT_LAYERS: layer counts)
      timeout ${FT_TIMEOUT:-300} python3 -u benchmarks/probes/train_phase_memory_probe.py --layers ${FT_LAYERS:-2,24} \
        --length 2048 --checkpointing on 2>&1 | tee -a $OUT/run.log ;;
    layers)  # each layer's decode update, kernels vs reference on the same inputs (docs/KERNELS.md)
      timeout 300 python3 -m oss_mlx.cli bench --config 20b --prompt-lengths 128 --decode-tokens 4 \
        --engines oss-mlx --check-layers 300 --results $RESULTS --json $OUT/layers.json 2>&1 | tee -a $OUT/run.log ;;
    sweep)  # each decode kernel alone per work size, timed from Python (launch cost included)
      timeout 150 python3 benchmarks/profile_decode.py --layers 2 --sweep --json $OUT/sweep.json 2>&1 | tee -a $OUT/run.log ;;
    profile)  # a decode step's graph (primitives) and time per depth
      timeout ${PROFILE_TIMEOUT:-200} python3 benchmarks/profile_decode.py --depths ${DEPTHS:-128,32768} \
        --json $OUT/profile.json 2>&1 | tee -a $OUT/run.log ;;
    ncu)  # each decode kernel's GPU time per work size, cold caches (Nsight Compute)
      timeout ${NCU_TIMEOUT:-400} ncu --cache-control all --clock-control none -k regex:oss_ \
        --metrics gpu__time_duration.sum --csv python3 benchmarks/ncu_sweep.py > $OUT/ncu.csv 2> $OUT/ncu.err
      python3 benchmarks/ncu_sweep.py --summarize $OUT/ncu.csv | tee -a $OUT/run.log ;;
    steps)  # every kernel of real decode steps at each depth, timed on the card (step_kernels.py);
            # SAMPLER=mlx: MLX's one-row argmax instead of generation's two-stage one (before / after)
            # ROWS="1 16": the batch sizes (streams decoding together, each prompt DEPTHS long)
      for r in ${ROWS:-1}; do for d in ${DEPTHS:-128 32768}; do
        timeout ${STEPS_TIMEOUT:-300} ncu --profile-from-start off --cache-control none --clock-control none \
          --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__registers_per_thread --csv \
          python3 benchmarks/step_kernels.py --depth $d --rows $r --steps 2 --sampler ${SAMPLER:-ours} \
          > $OUT/steps-$d-r$r.csv 2> $OUT/steps-$d-r$r.err
        echo "-- depth $d, rows $r" | tee -a $OUT/run.log
        python3 benchmarks/step_kernels.py --summarize $OUT/steps-$d-r$r.csv --steps 2 | tee -a $OUT/run.log
      done; done ;;
    detail)  # Nsight Compute's full sections for one launch of each decode kernel (stalls, occupancy)
      timeout ${DETAIL_TIMEOUT:-300} ncu --set full --cache-control all --clock-control none -k regex:oss_ \
        --page details --csv python3 benchmarks/ncu_sweep.py --detail > $OUT/detail.csv 2> $OUT/detail.err
      wc -l $OUT/detail.csv | tee -a $OUT/run.log ;;
    source)  # per-SASS-instruction stall samples of one launch of the kernels in KREGEX (ncu_sweep --detail)
      timeout ${SOURCE_TIMEOUT:-200} ncu --set full --cache-control all --clock-control none \
        -k regex:"${KREGEX:-oss_norm_qkv}" --launch-count 1 --page source --print-source sass --csv \
        python3 benchmarks/ncu_sweep.py --detail > $OUT/source.csv 2> $OUT/source.err
      wc -l $OUT/source.csv | tee -a $OUT/run.log ;;
    bench)  # docs/PERFORMANCE.md's table: both engines, one process; REPEAT=2 keeps each length's second run
      timeout ${BENCH_TIMEOUT:-300} python3 -m oss_mlx.cli bench --config ${CONFIG:-20b} \
        --prompt-lengths ${LENGTHS:-128,2048,8192,32768} --decode-tokens ${DECODE:-32} \
        --engines ${ENGINES:-oss-mlx,mlx-lm} ${REPEAT:+--repeat $REPEAT} ${WARMUP:+--warmup $WARMUP} \
        --results $RESULTS --json $OUT/bench.json 2>&1 | tee -a $OUT/bench.log ;;
    firsttests)  # the fixed prefill shapes (cuDNN's attention on the padded blocks), the warm-up, the caches
      timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -rf -p no:cacheprovider tests/test_first_prompt.py \
        tests/test_cache.py > $OUT/firsttests.log 2>&1
      echo "rc $?" | tee -a $OUT/run.log; tail -n 3 $OUT/firsttests.log | tee -a $OUT/run.log ;;
    cold)  # each length and a chat's first message as a fresh process's first prompt (cold), then again in
           # it (warm), load apart, both engines in one call (docs/PERFORMANCE.md "The first prompt")
      timeout ${BENCH_TIMEOUT:-570} python3 -m oss_mlx.cli bench --config ${CONFIG:-20b} --cold --ttft \
        --prompt-lengths ${LENGTHS:-128,2048,8192,32768} --decode-tokens ${DECODE:-32} \
        --engines ${ENGINES:-oss-mlx,mlx-lm} --cold-timeout ${COLD_TIMEOUT:-150} \
        --results $RESULTS --json $OUT/cold.json 2>&1 | tee -a $OUT/cold.log ;;
    coldbefore)  # the cold stage as the code was before (no fixed shapes, no load-time warm-up), oss-mlx only
      ( export OSS_MLX_FIXED_SHAPES=0; timeout ${BENCH_TIMEOUT:-300} python3 -m oss_mlx.cli bench --config 20b \
          --cold --ttft --prompt-lengths ${LENGTHS:-128} --decode-tokens ${DECODE:-32} --engines oss-mlx \
          --load-warmup off --cold-timeout ${COLD_TIMEOUT:-150} --results $RESULTS --json $OUT/cold-before.json ) \
        2>&1 | tee -a $OUT/cold.log ;;
    followup)  # 2k new after 8k / 32k cached beside a fresh 2k prompt, and decode after 128 and 32k, both engines
      timeout ${BENCH_TIMEOUT:-450} python3 -m oss_mlx.cli bench --config 20b --prompt-lengths 128,32768 \
        --decode-tokens ${DECODE:-64} --follow-up ${FOLLOW_DEPTHS:-8192,32768} --engines ${ENGINES:-oss-mlx,mlx-lm} \
        --results $RESULTS --json $OUT/followup.json 2>&1 | tee -a $OUT/followup.log ;;
    bench120)  # the 120b's peak memory at 8k / 32k (docs/MEMORY.md); STEP=512 is what load picks there
      timeout ${BENCH_TIMEOUT:-300} python3 -m oss_mlx.cli bench --config 120b \
        --prompt-lengths 8192,32768 --decode-tokens 8 --warmup 0 --engines oss-mlx ${STEP:+--prefill-step $STEP} \
        --results $RESULTS --json $OUT/bench120.json 2>&1 | tee $OUT/bench120.log ;;
    stream20)  # a converted `small` 20b streamed under a budget, 8k prompt (carry .device/vocab; docs/MEMORY.md)
      export TIKTOKEN_CACHE_DIR=$PWD/.device/vocab TIKTOKEN_RS_CACHE_DIR=$PWD/.device/vocab
      W=${SDIR:-/tmp/s20}; rm -rf $W
      ( time python3 -m oss_mlx.cli synthetic $W/src --config ${SCONF:-20b} --layout hf-mxfp4 ) 2>&1 | tail -4 | tee -a $OUT/stream20.log
      ( time python3 -m oss_mlx.cli convert $W/src $W/small --quality small ) 2>&1 | tail -6 | tee -a $OUT/stream20.log
      rm -rf $W/src; i=0
      for budget in ${BUDGETS:-7GB}; do
        for step in ${STEPS:-512}; do
          i=$((i + 1))
          timeout ${STREAM_TIMEOUT:-300} python3 -m oss_mlx.cli bench --model $W/small --memory-budget $budget \
            --engines oss-mlx --prompt-lengths ${SLEN:-8192} --decode-tokens 8 --warmup 0 --prefill-step $step \
            --results $RESULTS --json $OUT/stream20-$i.json 2>&1 | tee -a $OUT/stream20.log
        done
      done ;;
    *) echo "unknown stage $stage (see the list in benchmarks/README.md)" | tee -a $OUT/run.log; exit 2 ;;
  esac
done
