#!/usr/bin/env bash
# Does the image's Python environment resolve? Without Docker: pip resolves
# requirements-gpu.txt + requirements.txt for the image's platform (Python 3.12, Linux x86_64,
# glibc up to Ubuntu 24.04's 2.39), binary wheels only, and prints the resolved set.
# It reads package metadata only (no multi-GB CUDA wheels are downloaded); one to two minutes.
# A release runs it (docs/DEPLOY.md); tests/test_stack.py runs it when WAN_CHECK_IMAGE_DEPS=1.
#
# usage: bash scripts/check_image_deps.sh [--report FILE]   (exit 0: resolves; else pip's error)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
REPORT=""
if [ "${1:-}" = "--report" ]; then REPORT=$2; fi
PYVER=$(sed -n 's/^# python: *//p' requirements-gpu.txt)
platforms=(--platform linux_x86_64 --platform manylinux2014_x86_64)
for minor in $(seq 5 39); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
target=$(mktemp -d); out=${REPORT:-$target/report.json}
trap 'rm -rf "$target"' EXIT
# --target: older pips accept platform options only with it; nothing is installed (--dry-run).
"$PY" -m pip install --dry-run --quiet --ignore-installed --only-binary=:all: \
  --python-version "$PYVER" --implementation cp "${platforms[@]}" --target "$target/site" \
  -r requirements-gpu.txt -r requirements.txt --report "$out"
"$PY" - "$out" <<'PYEOF'
import json, sys
report = json.load(open(sys.argv[1]))
rows = sorted((i["metadata"]["name"], i["metadata"]["version"]) for i in report["install"])
for name, version in rows:
    print(f"{name}=={version}")
print(f"# {len(rows)} packages resolve for the image", file=sys.stderr)
PYEOF
