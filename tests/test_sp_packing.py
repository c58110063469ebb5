"""Sequence parallelism (``parallel.sequence_parallel``) and packed sequences (``batch.packing``)
change memory and padding, not results: whole training runs with and without them give the same
per-token log-probs, entropies, LESS-shaped advantages and per-step metrics, at TP2, PP2 and
TP2 x PP2, with the fused LM head and with logits, untied and tied (the tied model's other
layouts: tests/test_train.py, whose TP2 layouts run with SP on by default against TP1, and whose
TP2 gradients are checked against one process).

One 4-rank job trains each variant in turn (process start-up is the expensive part here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_less.parallel.spawn import run_distributed
from tests import train_fixtures
from tests.test_train import CONFIG, PARITY, _rows

SP_OFF, PACKED = "parallel.sequence_parallel=false", "batch.packing=true"
# name -> (model, tp, pp, overrides, the run it must equal: same model and layout, neither on)
VARIANTS = {
    "tp2": ("untied", 2, 1, [SP_OFF], None),
    "tp2_sp": ("untied", 2, 1, [], "tp2"),  # the default at tp > 1
    "tp2_sp_logits": ("untied", 2, 1, ["model.fused_lm_head=false"], "tp2"),
    "tp2_sp_packed": ("untied", 2, 1, [PACKED], "tp2"),
    "tp2_sp_packed_recompute": ("untied", 2, 1, [PACKED, "model.recompute_granularity=full"], "tp2"),
    "tp2_packed_logits": ("untied", 2, 1, [SP_OFF, PACKED, "model.fused_lm_head=false"], "tp2"),
    # megatron's own attention takes packed rows as a block-diagonal mask (SDPA and TE: THD boundaries)
    "tp2_packed_local": ("untied", 2, 1, [SP_OFF, PACKED, "model.attention=local"], "tp2"),
    "pp2": ("untied", 1, 2, [], None),
    "pp2_packed": ("untied", 1, 2, [PACKED], "pp2"),
    "tp2pp2": ("untied", 2, 2, [SP_OFF], None),
    "tp2pp2_sp_packed": ("untied", 2, 2, ["parallel.sequence_parallel=true", PACKED], "tp2pp2"),
    "tied_tp2": ("tied", 2, 1, [SP_OFF], None),
    "tied_tp2_sp_packed": ("tied", 2, 1, [PACKED], "tied_tp2"),
}
PER_TOKEN = ("old_logprobs", "rollout_logprobs", "entropy", "advantage")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {"untied": train_fixtures.run_inputs(tmp_path_factory, "untied", tie_word_embeddings=False),
            "tied": train_fixtures.run_inputs(tmp_path_factory, "tied")}


def _job(models, root):
    import torch.distributed as dist

    from megatron_less.trainer.config import load_config
    from megatron_less.trainer.loop import train

    out = {}
    for name, (model, tp, pp, extra, _) in VARIANTS.items():
        run_dir = Path(root) / name
        cfg = load_config(CONFIG, [
            f"model.hf_dir={models[model]['hf']}", f"data.train_file={models[model]['data']}", f"output_dir={run_dir}",
            "train.steps=2", "rollout.n=4", "batch.prompts_per_step=4", "batch.mini_batch_prompts=4",
            "batch.micro_batch_tokens=64", "log.rollouts_per_step=16", "checkpoint.every=0",
            f"parallel.tp={tp}", f"parallel.pp={pp}", *extra])  # fmt: skip
        run = train(cfg)
        config = run.policy.config
        out[name] = {"dir": str(run_dir), "sp": config.sequence_parallel, "tied": run.arch.tie_word_embeddings,
                     "packed": cfg.batch.packing}
    return out if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def runs(models):
    return run_distributed(_job, 4, (models, str(models["untied"]["root"] / "runs")), timeout=900)[0]


def _rollouts(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "rollouts.jsonl").read_text().splitlines()]


def test_switches_are_on_where_asked(runs):
    for name, (model, tp, pp, extra, _) in VARIANTS.items():
        assert runs[name]["sp"] == (tp > 1 and SP_OFF not in extra), name
        assert runs[name]["packed"] == (PACKED in extra), name
        assert runs[name]["tied"] == (model == "tied"), name


@pytest.mark.parametrize("name", [n for n, v in VARIANTS.items() if v[4]])
def test_same_run_with_and_without(runs, name):
    base_name = VARIANTS[name][4]
    base, got = _rows(runs[base_name]["dir"]), _rows(runs[name]["dir"])
    assert [r["step"] for r in got] == [1, 2] and any(r["actor/grad_norm"] > 0 for r in base)
    for a, b in zip(base, got):
        for k in PARITY + ("less/frac_tokens_correct_only", "less/frac_tokens_shared", "less/mean_weight"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), f"{name} step {a['step']} {k}"
    # every response rank 0 trained on (its data-parallel share), token by token
    ref, mine = _rollouts(runs[base_name]["dir"]), _rollouts(runs[name]["dir"])
    _, tp, pp, _, _ = VARIANTS[name]
    assert len(ref) == len(mine) == 2 * 16 // (4 // (tp * pp))
    for a, b in zip(ref, mine):
        assert a["token_ids"] == b["token_ids"] and a["less_class"] == b["less_class"]
        for k in PER_TOKEN:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (name, k)
