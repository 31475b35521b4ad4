#!/usr/bin/env bash
# One GPU run that takes every figure of benchmarks/RESULTS.md: the GPU tests, then every benchmark row with its
# reference row in the same process. The step limits add up to 590 s, so the whole run fits in 10 minutes, most
# important first. Logs and JSON go to $OUT (default /tmp/gpu_suite).
#   bash benchmarks/gpu_suite.sh            # everything, most important first; each step has its own time limit
set -u
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the log, never stop the suite
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print(torch.__version__, torch.version.cuda)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
# 1. correctness on the GPU: fast paths against the reference (greedy equality in fp32, bf16 tolerance)
step gpu_tests 90 $PY -m pytest -q -m gpu -x tests
# 2. sampling, d16 at the targets' batch (the headline rows: reference, fast, + the bf16 stream, + the loop graph)
step sample_d16 150 $PY -m benchmarks.timings.bench_sample --depths 16 --batches 64 --dtypes bf16 --repeats 5 \
  --json "$OUT/sample_d16.json"
# 3. where d16's time goes, and the candidates that choose the defaults (bf16 stream, decoder memory format)
step profile_d16 55 $PY -m benchmarks.timings.profile_sample --depth 16 --batch 64 --json "$OUT/profile_d16.json"
step sample_d30 80 $PY -m benchmarks.timings.bench_sample --depths 30 --batches 64 --dtypes bf16 --repeats 3 \
  --paths reference,loop_bf16 --json "$OUT/sample_d30.json"
# 4. the training step, d16 with and without the tokenizer encode (fast path: the compiled bf16 encoder), then d24
step train_d16_d24 90 $PY -m benchmarks.timings.bench_train --depths 16,24 --dtypes bf16 --batch 64 --repeats 5 \
  --fast_encode 2 --json "$OUT/train.json"
# 5. the tokenizer encode candidates with the share of token ids they change (never measured so far)
step encode 30 $PY -m benchmarks.timings.bench_encode --batch 64 --variants eager,compiled,bf16,bf16_cl,compiled_bf16 \
  --json "$OUT/encode.json"
# 6. d36 at 512 px: reference and the fastest path (loop graph, bf16 stream), batch 32 then 64 (rows are
#    written as they finish)
step sample_d36 95 $PY -m benchmarks.timings.bench_sample --depths '' --dtypes bf16 --repeats 2 --d36 \
  --d36_batches 32,64 --paths reference,loop_bf16 --json "$OUT/sample_d36.json"
cat "$OUT/summary.txt"
