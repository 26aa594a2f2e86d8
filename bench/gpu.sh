#!/usr/bin/env bash
# The GPU check kit: tests/gpu/, bench/gpu.py and bench/views.py on one GPU in under 8 minutes, then a report.
#
#   bench/gpu.sh [OUT_DIR]             on a CUDA machine, from a plain checkout (default OUT_DIR: bench/results/gpu-<time>)
#   bench/gpu.sh --dry-run [OUT_DIR]   the CPU-checkable parts on the CPU (tests skip, tiny benchmark), about a minute
#   bench/gpu.sh --fetch-wheels [DIR]  where there is network: download the pure-Python packages a bare GPU image
#                                      lacks (pydantic & co., for the shards mode) into DIR (default .whl) to carry
#
# Python: $PYTHON, else ./.venv/bin/python, else python3; it must already hold torch and torchvision (a GPU image's
# own, never replaced here: pinning torch would download gigabytes). Other missing packages are installed into
# /tmp/barlow-site from $BARLOW_WHEELS (default .whl) when that folder has wheels, else from the package index
# when it answers within a minute; a part that still lacks one reports it and the rest runs.
# Writes OUT_DIR/report.md (everything), gpu-bench.md / gpu-bench.json (the benchmark), tests.xml, and logs.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1; shift ;;
  --fetch-wheels)
    dir=${2:-.whl}; mkdir -p "$dir"
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
      'pydantic>=2.7,<3' pydantic-core annotated-types typing-inspection ;;
  -h|--help) sed -n 2,14p "$0"; exit 0 ;;
esac
OUT=${1:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
START=$(date +%s)

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
if ! "$PY" -c 'import torch, torchvision' 2>/dev/null; then
  echo "gpu.sh: $PY has no torch/torchvision; install the project first (pip install -e .)" >&2
  exit 2
fi

# Light dependencies barlow imports (the model, loss and optimizer need none of them; the shards mode does).
missing=$("$PY" - <<'EOF'
import importlib.util
need = {"pydantic": "pydantic", "yaml": "pyyaml", "fsspec": "fsspec", "PIL": "pillow", "numpy": "numpy", "pytest": "pytest"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
SITE=/tmp/barlow-site
if [[ -n "$missing" ]]; then
  wheels=${BARLOW_WHEELS:-.whl}
  echo "gpu.sh: missing: $missing" >&2
  if compgen -G "$wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$wheels"/*.whl
  else
    timeout 60 "$PY" -m pip install -q --retries 0 --timeout 5 --no-compile --target "$SITE" $missing \
      || echo "gpu.sh: could not install $missing (no wheels in $wheels, no package index); parts needing them report it" >&2
  fi
fi
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"  # tests/: shared test helpers (imagesets)
[[ -d $SITE ]] && export PYTHONPATH="$PYTHONPATH:$SITE"
export PYTHONUNBUFFERED=1

if [[ $DRY == 1 ]]; then
  TEST_LIMIT=120; BENCH_LIMIT=240; VIEWS_LIMIT=60; BENCH_ARGS=(--dry-run --steps 2 --warmup 1); VIEWS_ARGS=(--dry-run)
else
  TEST_LIMIT=150; BENCH_LIMIT=240; VIEWS_LIMIT=60; BENCH_ARGS=(); VIEWS_ARGS=(--device cuda)
fi  # 150 + 240 + 60 s: under 8 minutes with start-up

# tests/gpu only: --confcutdir keeps tests/conftest.py (the S3 server fixtures, botocore) out of a bare GPU image.
echo "== tests/gpu (limit ${TEST_LIMIT}s)" >&2
timeout "$TEST_LIMIT" "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider --confcutdir=tests/gpu \
  --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
TEST_RC=${PIPESTATUS[0]}

echo "== bench/gpu.py (limit ${BENCH_LIMIT}s)" >&2
timeout "$BENCH_LIMIT" "$PY" bench/gpu.py --out "$OUT" "${BENCH_ARGS[@]}" 2>&1 | tee "$OUT/bench.log"
BENCH_RC=${PIPESTATUS[0]}

echo "== bench/views.py: device decode + both views (limit ${VIEWS_LIMIT}s)" >&2
timeout "$VIEWS_LIMIT" "$PY" bench/views.py "${VIEWS_ARGS[@]}" 2>&1 | tee "$OUT/views.log"
VIEWS_RC=${PIPESTATUS[0]}

{
  echo "# GPU check kit report"
  echo
  echo "- date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ); wall time: $(( $(date +%s) - START )) s; dry run: $([[ $DRY == 1 ]] && echo yes || echo no)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | paste -sd ';')
  echo "- GPU: ${gpu:-none}"
  echo "- python: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)')"
  echo "- tests/gpu: exit $TEST_RC$([[ $TEST_RC == 124 ]] && echo ' (time limit)'): $(tail -n 1 "$OUT/tests.log")"
  echo "- bench/gpu.py: exit $BENCH_RC$([[ $BENCH_RC == 124 ]] && echo ' (time limit)')"
  echo "- bench/views.py: exit $VIEWS_RC$([[ $VIEWS_RC == 124 ]] && echo ' (time limit)')"
  echo
  echo "## tests/gpu"
  echo
  echo '```'
  grep -E '^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|error' "$OUT/tests.log" | tail -n 40
  echo '```'
  echo
  if [[ -f $OUT/gpu-bench.md ]]; then sed 's/^# /## /' "$OUT/gpu-bench.md"; else echo "## bench/gpu.py: no result (see bench.log)"; fi
  echo
  echo "## bench/views.py"
  echo
  echo '```'
  tail -n 30 "$OUT/views.log"
  echo '```'
} > "$OUT/report.md"
cat "$OUT/report.md"
[[ $TEST_RC == 0 || $TEST_RC == 5 ]] && [[ $BENCH_RC == 0 && $VIEWS_RC == 0 ]]  # 5: pytest collected nothing to run
