#!/usr/bin/env bash
# One recipe end to end on one node: HF folder -> megatron checkpoint -> GRPO + LESS training ->
# evaluation of the last checkpoint (six math benchmarks, 32 samples at T 0.1) -> HF folder.
#
#   HF_DIR=models/Qwen2.5-Math-7B TRAIN_FILE=data/math_train.jsonl \
#     bash examples/pipeline.sh qwen2.5-math-7b [key=value ...]
#
# RECIPE is a config in examples/configs/ (qwen2.5-math-1.5b, qwen2.5-math-7b, qwen2.5-7b);
# extra key=value arguments override it (e.g. train.steps=10). RUN_DIR (default runs/RECIPE)
# receives base/ (converted), checkpoints/, eval/ and hf/. TRAIN_FILE comes from
#   megatron-less prepare-data --source math_train --out data/math_train.jsonl
# A step whose output exists is skipped, so a rerun after a failure resumes where it stopped
# (training itself resumes from its newest checkpoint). For many nodes run the training step
# through examples/launch/slurm.sbatch with the same overrides. EVAL_ARGS adds options to the
# evaluation (megatron-less eval --help), e.g. EVAL_ARGS="--benchmarks math500,aime24".
set -euo pipefail

die() { echo "pipeline.sh: error: $*" >&2; exit 2; }
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || die "usage: pipeline.sh RECIPE [key=value ...] (RECIPE: a name in examples/configs/, e.g. qwen2.5-math-7b)"
RECIPE=$1; shift
CONFIG=examples/configs/$RECIPE.yaml
[ -f "$CONFIG" ] || die "no recipe $RECIPE ($CONFIG does not exist)"
[ -n "${HF_DIR:-}" ] || die "HF_DIR is not set: the HF folder of the starting model (config.json, *.safetensors, tokenizer)"
[ -f "$HF_DIR/config.json" ] || die "HF_DIR=$HF_DIR has no config.json"
[ -n "${TRAIN_FILE:-}" ] || die "TRAIN_FILE is not set: JSON Lines of prompt/answer (megatron-less prepare-data)"
[ -f "$TRAIN_FILE" ] || die "TRAIN_FILE=$TRAIN_FILE does not exist"
RUN_DIR=${RUN_DIR:-runs/$RECIPE}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export GPUS_PER_NODE

# the recipe's layouts and dtype, for the conversion, evaluation and export jobs
read -r TP ROLLOUT_TP DTYPE < <(python3 -c 'import sys, yaml; c = yaml.safe_load(open(sys.argv[1]))
print(c["parallel"].get("tp", 1), c["rollout"].get("rollout_tp", 1), c["model"].get("dtype", "fp32"))' "$CONFIG")

if [ ! -d "$RUN_DIR/base" ]; then
  echo "== convert $HF_DIR -> $RUN_DIR/base"
  megatron-less convert-hf --hf-dir "$HF_DIR" --out "$RUN_DIR/base" --tp "$TP" --dtype "$DTYPE"
fi

echo "== train $CONFIG"
bash examples/launch/torchrun.sh "$CONFIG" model.checkpoint="$RUN_DIR/base" model.tokenizer="$HF_DIR" \
  data.train_file="$TRAIN_FILE" output_dir="$RUN_DIR" "$@"

# the newest complete checkpoint (a crashed save leaves step_N.partial, never step_N)
CKPT=$(find "$RUN_DIR/checkpoints" -maxdepth 1 -name 'step_*' ! -name '*.partial' | sort | tail -n 1)
[ -n "$CKPT" ] || die "training wrote no checkpoint under $RUN_DIR/checkpoints"

if [ ! -f "$RUN_DIR/eval/$(basename "$CKPT")/eval_results.json" ]; then
  echo "== eval $CKPT"
  read -r -a eval_args <<< "${EVAL_ARGS:-}"
  MODEL=$CKPT TOKENIZER=$HF_DIR GPUS=$GPUS_PER_NODE TP=$TP ROLLOUT_TP=$ROLLOUT_TP \
    OUT_DIR="$RUN_DIR/eval/$(basename "$CKPT")" bash examples/eval_math.sh --dtype "$DTYPE" "${eval_args[@]}"
fi

if [ ! -d "$RUN_DIR/hf/$(basename "$CKPT")" ]; then
  echo "== export $CKPT -> $RUN_DIR/hf/$(basename "$CKPT")"
  megatron-less export-hf --ckpt "$CKPT" --out "$RUN_DIR/hf/$(basename "$CKPT")" --tokenizer "$HF_DIR" --dtype "$DTYPE"
fi
echo "== done: $RUN_DIR/hf/$(basename "$CKPT")"
