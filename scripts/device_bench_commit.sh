#!/usr/bin/env bash
# An older commit's own harness (python -m wan_worker.bench, before the harness left the package), on the
# same machine, payloads (unpacked by scripts/device_bench.sh first) and checkpoints as the current code.
# Prepare (git-ignored, carried as .dev/old):
#   mkdir -p .dev/old && git archive COMMIT src handler.py requirements.txt requirements-gpu.txt Dockerfile \
#     docs/PERFORMANCE.md | tar -x -C .dev/old && cp scripts/device_bench_commit.sh .dev/old/run.sh
# usage (device): bash .dev/old/run.sh [bench args...]   (writes $OUT/old.json, $OUT/old.log)
cd "$(dirname "$0")"
SITE=/tmp/bench-site BIN=/tmp/bench-bin
export PYTHONPATH="$PWD/src:$SITE" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export IMAGEIO_FFMPEG_EXE="$BIN/ffmpeg" WEED_BIN="$BIN/weed"
OUT=${OUT:-/tmp/bench-out}
set -o pipefail
python3 -m wan_worker.bench --models-dir /var/tmp/wanbench/models --work-dir /var/tmp/wanbench/work-old \
  --out "$OUT/old.json" "$@" 2>&1 | tee "$OUT/old.log" | grep -v "Loading\|it/s\]" | tail -30
