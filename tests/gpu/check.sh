#!/usr/bin/env bash
# Every GPU check and timing in one call, for a lent single-GPU machine (Python 3.12 + torch;
# no megatron-core, pydantic, math-verify or vLLM there): those travel as wheels in .whl/, which
# `bash tests/gpu/wheels.sh` fills here first.
#   device run: bash tests/gpu/check.sh [script ...]      (carry: .whl; timeout_s 600)
# Each script prints one [PASS] / [FAIL] / [SKIP] line per check, with its threshold (a [SKIP]
# says what was not checked), and [TIME] lines for its figures. A script that exits non-zero
# without a [FAIL] line (a crash, its time limit) counts as one failed check, and so does one
# that exits 0 with no check passed. All scripts share BUDGET_S seconds (default 460, under
# 8 minutes): a script left without time is a [SKIP]. The last line counts the checks passed /
# failed / skipped; the exit status is 0 only if some check passed and none failed. Without a
# GPU nothing runs: it says "no GPU: nothing checked" and exits 1.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
export PYTHONUNBUFFERED=1
t_start=$(date +%s)
BUDGET_S=${BUDGET_S:-460}

finish() {  # passed failed skipped [note]
  echo "check.sh: $1 passed, $2 failed, $3 skipped${4:+ - $4} ($(( $(date +%s) - t_start )) s)"
  if [ "$2" -eq 0 ] && [ "$1" -gt 0 ]; then exit 0; fi
  exit 1
}

if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "[SKIP] every check of tests/gpu/: python3 has no torch that sees a CUDA device here"
  finish 0 0 1 "no GPU: nothing checked"
fi
if ! python3 -c "import megatron.core, pydantic, math_verify" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "[FAIL] setup: megatron-core / pydantic / math-verify are not importable and .whl/ holds no wheels" \
         "(run bash tests/gpu/wheels.sh where pip works, then carry .whl)"
    finish 0 1 0
  fi
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    echo "[FAIL] setup: installing .whl/*.whl failed"
    finish 0 1 0
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, '| megatron-core', m.__version__)"
out=${OUT:-/tmp/gpu-out}; mkdir -p "$out"

# seconds each script may take at most (the shared budget may give it less)
declare -A LIMIT=([tests/gpu/megatron_gpu.py]=120 [tests/gpu/recipe_gpu.py]=300 [tests/gpu/train_gpu.py]=150
                  [tests/gpu/vocab_parallel_gpu.py]=120 [tests/gpu/step_speed_gpu.py]=180
                  [tests/gpu/sp_packing_gpu.py]=120 [tests/gpu/bridge_gpu.py]=90)
scripts=("$@")
[ ${#scripts[@]} -gt 0 ] || scripts=(tests/gpu/megatron_gpu.py tests/gpu/recipe_gpu.py tests/gpu/train_gpu.py
                                     tests/gpu/vocab_parallel_gpu.py tests/gpu/step_speed_gpu.py
                                     tests/gpu/sp_packing_gpu.py tests/gpu/bridge_gpu.py)
passed=0 failed=0 skipped=0
for script in "${scripts[@]}"; do
  left=$(( BUDGET_S - ($(date +%s) - t_start) ))
  limit=${LIMIT[$script]:-300}
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 30 ]; then
    echo "[SKIP] $script: not run, the ${BUDGET_S} s budget of this call is spent (run it alone: bash tests/gpu/check.sh $script)"
    skipped=$((skipped + 1))
    continue
  fi
  log="$out/$(basename "$script" .py).log"
  echo "=== $script (at most ${limit} s)"
  # python's warnings are dropped from the screen (they stay in the log); result lines start with [
  timeout "$limit" python3 "$script" 2>&1 | tee "$log" | grep --line-buffered -v -E '^[^[].*(Warning|warn\()'
  rc=${PIPESTATUS[0]}
  p=$(grep -c '^\[PASS\]' "$log") f=$(grep -c '^\[FAIL\]' "$log") s=$(grep -c '^\[SKIP\]' "$log")
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
    [ "$rc" -eq 124 ] && why="killed at its ${limit} s limit" || why="exit status $rc"
    echo "[FAIL] $script: $why, with no [FAIL] line (a crash or a hang; see $log)"
    f=1
  elif [ "$rc" -eq 0 ] && [ "$p" -eq 0 ]; then
    echo "[FAIL] $script: exit status 0 but no check passed"
    f=1
  fi
  echo "=== $script: exit $rc, $p passed, $f failed, $s skipped"
  passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
done
finish "$passed" "$failed" "$skipped"
