#!/usr/bin/env bash
# Fills .whl/ (git-ignored through .git/info/exclude) with the Python 3.12 x86-64 wheels that
# tests/gpu/check.sh needs on the lent GPU machine and its image lacks: megatron-core, pydantic
# (the training config) and math-verify (the reward), each with the dependencies the image does
# not have. Run it here, where pip reaches an index; then carry .whl (about 5 MiB):
#   bash tests/gpu/wheels.sh            MCORE=0.16.1 bash tests/gpu/wheels.sh
# MCORE: the megatron-core version (default 0.19.2, the one benchmarks/RESULTS.md's GPU runs used).
set -euo pipefail
cd "$(dirname "$0")/../.."
MCORE=${MCORE:-0.19.2}
PY=${PYTHON:-python3}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" .whl
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -f .whl/*.whl
# versions as in constraints.txt (pydantic-core pinned by pydantic 2.13.4, the others by math-verify)
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  "megatron-core==$MCORE" pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
ls -l .whl
