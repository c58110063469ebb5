"""Micro-batch layouts (trainer/batch.py) and what the model is told about packed rows
(models/packing.py): padded rows and packed rows hold the same tokens, loss positions and
per-token values, and map back to the same response layout; packing meets its budget and cuts
the padding on a realistic length mix; packed rows attend within each sequence only."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_less.models.packing import packed_inputs
from megatron_less.trainer.batch import (
    Sequence,
    build_microbatch,
    plan_microbatches,
    plan_packs,
    response_mask,
    to_response_layout,
)


def _seqs(lengths, seed=0):
    """Sequences with (prompt, response) lengths, random tokens."""
    g = torch.Generator().manual_seed(seed)
    return [Sequence(k, torch.randint(3, 99, (p,), generator=g).tolist(), torch.randint(3, 99, (r,), generator=g).tolist(),
                     [], "stop") for k, (p, r) in enumerate(lengths)]  # fmt: skip


def test_plan_packs_meets_the_budget_and_places_every_row_once():
    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(200)] + [150]  # one row longer than the budget
    plans = plan_packs(lengths, 100)
    assert sorted(i for p in plans for i in p) == list(range(len(lengths)))
    assert [p for p in plans if sum(lengths[i] for i in p) > 100] == [[200]]  # the long row, alone
    assert all(p == sorted(p) for p in plans)
    # first-fit decreasing: within 11/9 of the lower bound (+1 for the bound's rounding)
    assert len(plans) <= 11 / 9 * -(-sum(lengths) // 100) + 1
    assert plan_packs(lengths, 100) == plans  # deterministic


def test_packing_cuts_the_padding_of_a_realistic_length_mix():
    """Prompt + response lengths spread as in a math RL batch (short and long responses mixed):
    padded micro-batches spend a large share on padding, packed ones almost none."""
    rng = random.Random(1)
    seqs = _seqs([(rng.randint(40, 200), min(3072, int(rng.lognormvariate(6.3, 0.8))) + 1) for _ in range(256)])
    lengths = [s.length for s in seqs]

    def padding(plans, packed):
        mbs = [build_microbatch(seqs, p, {}, multiple=4, packed=packed) for p in plans]
        return 1 - sum(lengths) / sum(m.tokens.numel() for m in mbs), len(mbs)

    padded, n_padded = padding(plan_microbatches(lengths, 8192), False)
    packed, n_packed = padding(plan_packs(lengths, 8192), True)
    assert packed < 0.002 and padded > 10 * packed, (padded, packed)
    assert n_packed <= n_padded


@pytest.mark.parametrize("multiple", [1, 2])
def test_packed_and_padded_rows_hold_the_same_values(multiple):
    seqs = _seqs([(3, 5), (6, 2), (2, 9), (4, 4)])
    width = max(len(s.response) for s in seqs)
    g = torch.Generator().manual_seed(1)
    per_token = {"advantages": torch.randn(4, width, generator=g) * response_mask(seqs)}
    rows = [2, 0, 3]
    padded = build_microbatch(seqs, rows, per_token, multiple=multiple)
    packed = build_microbatch(seqs, rows, per_token, multiple=multiple, packed=True)
    total = sum(seqs[i].length for i in rows)
    assert packed.tokens.shape == (1, total + (-total % multiple)) and packed.lengths == [11, 8, 8]
    assert padded.tokens.shape[1] % multiple == 0 and packed.tokens.shape[1] % multiple == 0
    assert packed.num_tokens == padded.num_tokens == 9 + 5 + 4
    # the same tokens, loss positions and per-token values, sequence by sequence
    for k, ((row, at), n) in enumerate(zip(packed.places(), packed.lengths)):
        assert packed.tokens[row, at : at + n].tolist() == padded.tokens[k, :n].tolist()
        assert packed.loss_mask[row, at : at + n - 1].tolist() == padded.loss_mask[k, : n - 1].tolist()
        assert torch.equal(packed.extra["advantages"][row, at : at + n - 1], padded.extra["advantages"][k, : n - 1])
        if at + n - 1 < packed.loss_mask.shape[1]:
            assert not packed.loss_mask[row, at + n - 1]  # predicting the next sequence's first token: no loss
    # and back to the response layout
    for mb in (padded, packed):
        out = torch.zeros(4, width)
        to_response_layout(mb, mb.extra["advantages"], seqs, out)
        assert torch.equal(out[rows], per_token["advantages"][rows]) and not out[1].any()


def test_packed_inputs_restart_positions_and_keep_sequences_apart():
    kw = packed_inputs([3, 2], 6, "cpu", kind="local")
    assert kw["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    allowed = ~kw["attention_mask"][0, 0]  # True = masked, megatron's convention
    want = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                         [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)  # fmt: skip
    assert torch.equal(allowed, want)
    te = packed_inputs([3, 2], 6, "cpu", kind="te")
    p = te["packed_seq_params"]
    assert te["attention_mask"] is None and p.qkv_format == "thd"
    assert p.cu_seqlens_q.tolist() == [0, 3, 5, 6] and p.cu_seqlens_q.dtype == torch.int32 and p.max_seqlen_q == 3
    with pytest.raises(ValueError, match="do not fill a packed row"):
        packed_inputs([3, 4], 6, "cpu", kind="local")


def test_packing_with_te_in_fp32_is_refused_before_anything_runs(monkeypatch, tmp_path):
    from pathlib import Path

    from megatron_less.models import qwen2
    from megatron_less.trainer.config import ConfigError, check_layout, load_config
    from tests import tiny

    config = Path(__file__).resolve().parent.parent / "examples" / "configs" / "tiny_cpu.yaml"
    arch = qwen2.Qwen2Arch.from_hf(tiny.BASE)
    cfg = load_config(config, ["batch.packing=true"], check_paths=False)
    assert check_layout(cfg, arch, 1) == 1  # no TE here: the local spec takes a mask
    monkeypatch.setattr(qwen2, "have_te", lambda: True)
    with pytest.raises(ConfigError, match="batch.packing with TransformerEngine's attention"):
        check_layout(cfg, arch, 1)
    for ok in (["model.dtype=bf16"], ["model.attention=sdpa"]):
        assert check_layout(load_config(config, ["batch.packing=true", *ok], check_paths=False), arch, 1) == 1
