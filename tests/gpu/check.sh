#!/usr/bin/env bash
# Every GPU check and timing in one call, for a lent single-GPU machine (Python 3.12 + torch,
# no megatron-core or vLLM there): megatron-core travels as a wheel in .whl/ (see README).
#   device run: bash tests/gpu/check.sh [script ...]        (carry: .whl)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
export PYTHONUNBUFFERED=1
if ! python3 -c "import megatron.core" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
status=0
out=${OUT:-/tmp/gpu-out}; mkdir -p "$out"
scripts=("$@")
[ ${#scripts[@]} -gt 0 ] || scripts=(tests/gpu/vocab_parallel_gpu.py tests/gpu/megatron_gpu.py tests/gpu/train_gpu.py tests/gpu/step_speed_gpu.py)
for script in "${scripts[@]}"; do
  echo "=== $script"
  timeout 300 python3 "$script" 2>&1 | grep -v -i "warn" | tee "$out/$(basename "$script" .py).log"
  rc=${PIPESTATUS[0]}
  echo "=== $script exit $rc"
  [ "$rc" -eq 0 ] || status=1
done
exit $status
