#!/usr/bin/env bash
# The GPU check kit (its Python in bench/gpu/): a preflight, then tests/gpu/ with the two-ranks test, bench/gpu/gpu.py,
# bench/views.py, and the compile tests and benchmark last, on one GPU in under 8 minutes; report.md is written after
# every part.
#
#   bench/gpu.sh [OUT_DIR]             on a CUDA machine, from a plain checkout (default OUT_DIR: bench/results/gpu-<time>)
#   bench/gpu.sh --dry-run [OUT_DIR]   every part on the CPU (CUDA tests skip, tiny benchmark): checks the kit here
#   bench/gpu.sh --fetch-wheels [DIR]  where there is network: the wheels the GPU test machine's image lacks for the
#                                      kit (bench/gpu/preflight.py --wheels: pydantic and its needs, pytest and its needs)
#                                      into DIR (default .whl)
#
# Python: $PYTHON, else ./.venv/bin/python, else python3; it must already hold torch and torchvision (the GPU image's
# own, never replaced here: torch's wheels are gigabytes). Wheels in $BARLOW_WHEELS (default .whl) are installed into
# /tmp/barlow-site and put first on the path; without them, where the Python lacks one, the kit stops in one line.
# Each part runs under its own time limit inside the kit's 470 s (dry run: 1500 s); a part that fails or is stopped
# loses no other part's results. Writes OUT_DIR/report.md, preflight.md, tests*.xml, gpu-bench*.{md,json}, *.log.
set -uo pipefail
cd "$(dirname "$0")/.."

fetch_wheels() {  # DIR: the pinned wheels of bench/gpu/preflight.py --wheels for CPython 3.12 on x86-64 Linux
  local dir=$1 reqs total
  mkdir -p "$dir" && rm -f "$dir"/*.whl
  mapfile -t reqs < <(python3 bench/gpu/preflight.py --wheels)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "${reqs[@]}" || return 1
  ls -l "$dir"/*.whl
  total=$(du -cb "$dir"/*.whl | tail -n 1 | cut -f1)
  echo "gpu.sh: $(ls "$dir"/*.whl | wc -l) wheels for ${#reqs[@]} requirements, $(( total / 1024 )) KiB in $dir" \
    "(a device run carries at most 64 MiB)"
  (( total < 64 * 1024 * 1024 ))
}

DRY=0
case "${1:-}" in
  --dry-run) DRY=1; shift ;;
  --fetch-wheels) fetch_wheels "${2:-.whl}"; exit $? ;;
  -h|--help) sed -n 2,16p "$0"; exit 0 ;;
esac
OUT=${1:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
START=$(date +%s)
if [[ $DRY == 1 ]]; then BUDGET=1500; else BUDGET=470; fi  # 470 s: under 8 minutes with the report
DEADLINE=$(( START + BUDGET ))

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
if ! "$PY" -c 'import torch, torchvision' 2>/dev/null; then
  echo "gpu.sh: $PY has no torch/torchvision; install the project first (pip install -e .)" >&2
  exit 2
fi

SITE=/tmp/barlow-site
wheels=${BARLOW_WHEELS:-.whl}
missing=$("$PY" -c '
import importlib.util as u
def lacks(m):
    try:
        return u.find_spec(m) is None
    except Exception:  # a broken install is missing too
        return True
print(" ".join(m for m in ("pydantic", "yaml", "fsspec", "PIL", "numpy", "pytest") if lacks(m)))')
if compgen -G "$wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$wheels"/*.whl \
    || echo "gpu.sh: the wheels in $wheels did not install; parts needing them report it" >&2
elif [[ -n "$missing" ]]; then  # the GPU machine is offline: say what to carry, in one line, and run nothing
  echo "gpu.sh: error: $PY lacks $missing and $wheels/ holds no wheels: run bench/gpu.sh --fetch-wheels where there is network, then carry $wheels (the device tool's carry: [\".whl\"]; bench/gpu/README.md)" >&2
  exit 2
fi
# tests/support: shared test helpers and oracles (imagesets, device_decoders, reference_views); the carried wheels
# first, before the image's own
export PYTHONPATH="${SITE}:$PWD:$PWD/tests/support${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

: > "$OUT/parts.tsv"
report() {  # report.md from what the parts left; kit_report.py writes it whole or not at all
  "$PY" bench/gpu/kit_report.py "$OUT" "$DRY" "$START" 2>"$OUT/report.err" && return 0
  { echo "# GPU check kit report (bench/gpu/kit_report.py failed: see report.err)"; echo; cat "$OUT/parts.tsv"; } > "$OUT/report.md"
}
trap 'echo "gpu.sh: stopped" >&2; report; exit 130' INT TERM

# part NAME LIMIT_S COMMAND...: runs under min(LIMIT_S, time left), logs to OUT/NAME.log, records, rewrites report.md
part() {
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$OUT/parts.tsv"; report; return
  fi
  echo "== $name (limit ${limit}s)" >&2
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 5 "$OUT/$name.log" >&2
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >> "$OUT/parts.tsv"
  report
}

# -v: a line per finished test, so a part stopped at its limit still shows which ran; --confcutdir keeps
# tests/conftest.py (the S3 fixtures) out
PYTEST=("$PY" -m pytest -v -rfEs -p no:cacheprovider --confcutdir=tests/gpu -o addopts="")
"$PY" -c 'import pytest_timeout' 2>/dev/null && PYTEST+=(--timeout=120)  # one hung test does not eat the part
KIT_TESTS=(tests/gpu tests/runtime/test_two_ranks_one_device.py tests/runtime/test_distributed.py tests/data/test_handover.py)
if [[ $DRY == 1 ]]; then
  BENCH=(--dry-run --steps 1 --warmup 1 --configs reference "torch.compile on"); VIEWS=(--dry-run)
else
  BENCH=(); VIEWS=(--device cuda)
fi

lim() { if [[ $DRY == 1 ]]; then echo "$2"; else echo "$1"; fi; }  # GPU limit, dry-run limit (a busy 2-core CPU)
part preflight "$(lim 45 120)" "$PY" bench/gpu/preflight.py --out "$OUT"
part tests "$(lim 160 400)" "${PYTEST[@]}" "${KIT_TESTS[@]}" -k "not compile" --junitxml="$OUT/tests.xml"
part bench "$(lim 150 300)" "$PY" bench/gpu/gpu.py --out "$OUT" --compile skip "${BENCH[@]}"
part views "$(lim 45 120)" "$PY" bench/views.py "${VIEWS[@]}"
# Compilation last: the slowest to start, and the likeliest to meet the time limit.
part compile-tests "$(lim 50 120)" "${PYTEST[@]}" "${KIT_TESTS[@]}" -k compile --junitxml="$OUT/tests-compile.xml"
part compile-bench "$(lim 60 300)" "$PY" bench/gpu/gpu.py --out "$OUT" --compile only --tag compile "${BENCH[@]}"
trap - INT TERM
report
cat "$OUT/report.md"
# exit 0 only when every part passed (5: pytest collected nothing, as a dry run's CUDA-only selection may)
! awk -F'\t' '$2 != "0" && $2 != "5"' "$OUT/parts.tsv" | grep -q .
