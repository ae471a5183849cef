#!/usr/bin/env bash
# How long the worker's start-up imports take on the GPU machine, on a cold page cache and a warm
# one: the CPU floor of a cold start. Run after scripts/device_bench.sh --shipped-env (its venv).
# usage: bash scripts/device_import_timing.sh   (writes $OUT/imports-{cold,warm}.txt, -X importtime logs)
set -u
PY=${PY:-/tmp/shipped-venv/bin/python3}
export PYTHONPATH="$PWD:$PWD/src"
IMPORTS="import torch; from wan_worker.serving import worker; import diffusers.pipelines.wan.pipeline_wan, transformers.models.umt5.modeling_umt5"
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
for run in cold warm; do
  [ "$run" = cold ] && { sync; echo 3 > /proc/sys/vm/drop_caches; }
  start=$(date +%s.%N)
  "$PY" -X importtime -c "$IMPORTS" 2> "$OUT/imports-$run.txt"
  end=$(date +%s.%N)
  echo "imports $run: $(python3 -c "print(round($end - $start, 2))") s, $(grep -c 'import time:' "$OUT/imports-$run.txt") modules"
done
