#!/usr/bin/env bash
# Evaluate a model on the six math benchmarks (avg@32 / pass@k / worst@k / std@k at T=0.1, as in
# the LESS paper's validation), on one node with torchrun.
#   MODEL=Qwen2.5-Math-1.5B GPUS=8 bash examples/eval_math.sh
# MODEL: an HF folder or a megatron-less checkpoint (then also TOKENIZER=<HF folder>).
set -euo pipefail
MODEL=${MODEL:?set MODEL to an HF folder or a megatron-less checkpoint}
GPUS=${GPUS:-1}
TP=${TP:-1}            # policy tensor parallel
ROLLOUT_TP=${ROLLOUT_TP:-1}
extra=()
[ -n "${TOKENIZER:-}" ] && extra+=(--tokenizer "$TOKENIZER")
cli=$(python3 -c "import megatron_less.cli as c; print(c.__file__)")
torchrun --standalone --nproc_per_node "$GPUS" "$cli" eval \
  --model "$MODEL" "${extra[@]}" --tp "$TP" --rollout-tp "$ROLLOUT_TP" \
  --num-samples "${N:-32}" --temperature "${TEMPERATURE:-0.1}" --top-p "${TOP_P:-1.0}" \
  --max-tokens "${MAX_TOKENS:-3072}" --out-dir "${OUT_DIR:-outputs/eval}" "$@"
