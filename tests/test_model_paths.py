"""The model's fast paths against the plain ones, through the trainer's own passes, at TP1, TP2
and PP2 (DP fills the 4 ranks), tied and untied LM head, padded vocabulary (250 -> 256/512),
temperature 0.7, fp32:

- fused LM head (hidden states -> ops.lm_head_logprob_entropy) vs logits -> vocab-parallel op:
  old log-probs and entropies (no-grad pass), and every parameter's gradient of a PPO-clip step
  with an entropy bonus (so the entropy's gradient flows too);
- SDPA core attention vs megatron's unfused local attention: logits and gradients, causal and
  with an explicit block-diagonal mask of packed sequences; and packing honoured (a packed
  sequence's logits equal those of the same sequence alone).

One 4-rank gloo job computes everything; the tests compare.
"""

import pytest
import torch

from megatron_less.parallel.spawn import run_distributed
from tests import tiny

LAYOUTS = [(1, 1), (2, 1), (1, 2)]
TEMP = 0.7
REL = 1e-5
# packed row: sequences of these lengths, then padding (its own block) up to PACK_LEN
PACKS, PACK_LEN = [[10, 14], [20]], 24


def _sequences(vocab):
    from megatron_less.trainer.batch import Sequence

    g = torch.Generator().manual_seed(5)
    seqs = []
    for k, (p, r) in enumerate([(3, 9), (5, 4), (2, 12), (4, 7), (6, 2), (3, 10)]):
        prompt, resp = torch.randint(3, vocab, (p + r,), generator=g).split([p, r])
        seqs.append(Sequence(k // 2, prompt.tolist(), resp.tolist(), [], "stop"))
    width = max(len(s.response) for s in seqs)
    per_token = {"old_logprobs": -torch.rand(len(seqs), width, generator=g) * 6,
                 "advantages": torch.randn(len(seqs), width, generator=g)}
    return seqs, per_token


def _packed(vocab):
    """tokens, positions (restarting per sequence) and the mask megatron takes (True = masked)."""
    g = torch.Generator().manual_seed(6)
    tokens = torch.randint(3, vocab, (len(PACKS), PACK_LEN), generator=g)
    pos = torch.zeros(len(PACKS), PACK_LEN, dtype=torch.long)
    seg = torch.zeros(len(PACKS), PACK_LEN, dtype=torch.long)
    for b, lens in enumerate(PACKS):
        start = 0
        for k, n in enumerate(lens + [PACK_LEN - sum(lens)]):
            pos[b, start : start + n] = torch.arange(n)
            seg[b, start : start + n] = k
            start += n
    causal = torch.ones(PACK_LEN, PACK_LEN, dtype=torch.bool).tril()
    allowed = causal & (seg[:, :, None] == seg[:, None, :])
    return tokens, pos, ~allowed[:, None]


def _full_grads(policy, arch):
    """Every parameter's accumulated gradient as full HF-named tensors, on every rank."""
    from megatron_less.parallel.gather import iter_all_hf_tensors

    saved = {}
    for name, p in policy.module.named_parameters():
        saved[name] = p.data
        p.data = p.main_grad.view_as(p).to(p.dtype)
    grads = {n: g.clone() for n, g in iter_all_hf_tensors(policy.module, arch)}
    for name, p in policy.module.named_parameters():
        p.data = saved[name]
    return grads


def _gathered_logits(out):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, out.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, -1)


def _attention_case(policy, arch, tokens, pos, mask):
    """Full-vocabulary logits (last stage) and gradients of a fixed linear function of them."""
    from megatron.core import parallel_state as ps

    from megatron_less.models.policy import forward_backward

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    vpad = arch.padded_vocab_size(tp)
    coef = torch.randn(*tokens.shape, vpad, generator=torch.Generator().manual_seed(9)).chunk(tp, -1)[rank]
    logits = []

    def step(data_iter, model):
        next(data_iter)
        out = model(tokens, pos, mask)

        def loss(o):
            logits.append(_gathered_logits(o))
            return (o * coef).sum(), torch.tensor(1, dtype=torch.int), {}

        return out, loss

    forward_backward(policy, [tokens], step, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0])
    return (logits[0] if logits else None), _full_grads(policy, arch)


def _job():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_less.models import qwen2
    from megatron_less.models.policy import OptimConfig, build_policy
    from megatron_less.parallel import runtime
    from megatron_less.trainer.batch import build_microbatch
    from megatron_less.trainer.passes import LossSpec, logprobs_and_entropy, train_minibatch

    out = {}
    for tied in (True, False):
        arch = qwen2.Qwen2Arch.from_hf(dict(tiny.BASE, tie_word_embeddings=tied))
        hf = tiny.hf_model(seed=0, tie_word_embeddings=tied).state_dict()
        seqs, per_token = _sequences(arch.vocab_size)
        mbs = [build_microbatch(seqs, rows, per_token) for rows in ([0, 1, 2], [3, 4, 5])]
        tokens, pos, mask = _packed(arch.vocab_size)
        for tp, pp in LAYOUTS:
            runtime.initialize(tp, pp, seed=7)
            layout = dict(calculate_per_token_loss=True)
            if pp > 1:
                layout.update(variable_seq_lengths=True, batch_p2p_comm=False, moe_token_dispatcher_type="alltoall")
            for attention in ("local", "sdpa"):
                policy = build_policy(arch, tp=tp, pp=pp, hf_weights=hf, optim=OptimConfig(), attention=attention,
                                      **layout)
                res = {}
                for fused in (True, False):
                    lp, ent = logprobs_and_entropy(policy.model, seqs, mbs, temperature=TEMP,
                                                   vocab_size=arch.vocab_size, fused_lm_head=fused)
                    spec = LossSpec("ppo_clip", {}, "token-mean", TEMP, arch.vocab_size, 12, entropy_coef=0.01,
                                    fused_lm_head=fused)
                    train_minibatch(policy, mbs, spec)
                    res[fused] = dict(lp=lp, ent=ent, grads=_full_grads(policy, arch))
                res["causal"] = _attention_case(policy, arch, tokens, pos, None)
                res["packed"] = _attention_case(policy, arch, tokens, pos, mask)
                # the second packed sequence of row 0, alone
                alone = slice(PACKS[0][0], sum(PACKS[0]))
                res["alone"] = _attention_case(policy, arch, tokens[:1, alone], pos[:1, alone], None)[0]
                if attention == "sdpa" and tied:  # recomputation changes memory, not gradients
                    for knobs in (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
                                  dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
                                  dict(recompute_granularity="selective")):
                        again = build_policy(arch, tp=tp, pp=pp, hf_weights=hf, optim=OptimConfig(),
                                             attention=attention, **layout, **knobs)
                        assert again.config.recompute_granularity == knobs["recompute_granularity"]
                        train_minibatch(again, mbs, spec)
                        res[knobs.get("recompute_method", "selective")] = _full_grads(again, arch)
                keep = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                out[(tied, tp, pp, attention)] = res if keep or dist.get_rank() == 0 else None
    runtime.destroy()  # once: a re-created default group would wait on the old store
    return out


@pytest.fixture(scope="module")
def runs():
    per_rank = run_distributed(_job, 4, timeout=900)
    merged = {}
    for key in per_rank[0]:
        # logits live on the last stage: take a rank that holds them
        merged[key] = next(r[key] for r in per_rank if r[key] is not None and r[key]["causal"][0] is not None)
        merged[key]["grads_rank0"] = per_rank[0][key]
    return merged


def _rel(got, ref):
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def _assert_grads(got, ref, what):
    assert set(got) == set(ref) and len(got) > 10
    worst = max(((_rel(got[n], ref[n]), n) for n in ref))
    assert worst[0] < REL, (what, worst)


KEYS = [(tied, tp, pp, att) for tied in (True, False) for tp, pp in LAYOUTS for att in ("local", "sdpa")]


@pytest.mark.parametrize("key", KEYS)
def test_fused_lm_head_matches_logits_path(runs, key):
    fused, plain = runs[key][True], runs[key][False]
    assert _rel(fused["lp"], plain["lp"]) < REL and _rel(fused["ent"], plain["ent"]) < REL
    assert plain["ent"].abs().sum() > 0 and plain["lp"].abs().sum() > 0
    _assert_grads(fused["grads"], plain["grads"], "fused vs logits")


@pytest.mark.parametrize("key", [k for k in KEYS if k[1:3] != (1, 1)])
def test_layouts_match_tp1(runs, key):
    ref = runs[(key[0], 1, 1, key[3])]
    got = runs[key]
    assert _rel(got[True]["lp"], ref[True]["lp"]) < REL
    _assert_grads(got[True]["grads"], ref[True]["grads"], "layout vs TP1")


@pytest.mark.parametrize("key", [k for k in KEYS if k[3] == "sdpa"])
@pytest.mark.parametrize("case", ["causal", "packed"])
def test_sdpa_matches_local_attention(runs, key, case):
    sdpa, local = runs[key][case], runs[key[:3] + ("local",)][case]
    assert _rel(sdpa[0], local[0]) < REL
    _assert_grads(sdpa[1], local[1], f"sdpa vs local, {case}")
    # the trainer's passes too: the whole PPO step's gradients
    _assert_grads(runs[key][True]["grads"], runs[key[:3] + ("local",)][True]["grads"], "sdpa vs local, step")


@pytest.mark.parametrize("key", [k for k in KEYS if k[0] and k[3] == "sdpa"])
@pytest.mark.parametrize("how", ["uniform", "block", "selective"])
def test_recompute_keeps_gradients(runs, key, how):
    # spec of the last loop turn: fused_lm_head=False
    _assert_grads(runs[key][how], runs[key][False]["grads"], f"recompute {how}")


def test_config_recompute_knobs_reach_megatron():
    from megatron_less.models import qwen2
    from megatron_less.trainer.config import ModelCfg

    arch = qwen2.Qwen2Arch.from_hf(dict(tiny.BASE))
    for knobs, want in ((dict(recompute_granularity="none"), None),
                        (dict(recompute_granularity="selective"), "selective"),
                        (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2), "full")):
        cfg = ModelCfg(hf_dir="x", **knobs)
        config = qwen2.transformer_config(arch, **cfg.megatron_overrides())
        assert config.recompute_granularity == want
        if want == "full":
            assert (config.recompute_method, config.recompute_num_layers) == ("block", 2)
    assert ModelCfg(hf_dir="x").fused_lm_head and ModelCfg(hf_dir="x").attention == "auto"


@pytest.mark.parametrize("key", KEYS)
def test_packed_mask_is_honoured(runs, key):
    packed, alone = runs[key]["packed"][0], runs[key]["alone"]
    seg = packed[:1, PACKS[0][0] : sum(PACKS[0])]
    assert _rel(seg, alone) < REL
    # and it matters: without the mask the same positions see the first sequence
    causal = runs[key]["causal"][0][:1, PACKS[0][0] : sum(PACKS[0])]
    assert _rel(causal, alone) > 1e-2
