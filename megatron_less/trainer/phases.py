"""The phases of one GRPO step, in the order the loop calls them. Each takes the run and what the
previous phase produced; collective calls are named as such."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megatron_less.algos import apply_correction, compute_token_advantages, group_has_signal, overlong_penalty
from megatron_less.models.schedule import sequence_multiple
from megatron_less.parallel import faults
from megatron_less.rollout.base import SamplingParams
from megatron_less.trainer import batch as B
from megatron_less.trainer.passes import LossSpec, logprobs_and_entropy, optimizer_step, train_minibatch


class Timer(dict):
    """Seconds per named phase of a step (summed over repeats)."""

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self[name] = self.get(name, 0.0) + time.perf_counter() - t0


def collect(run, step: int, timer) -> tuple[list, list[B.Sequence], dict]:
    """The step's prompts and their scored responses (collective). Without dynamic sampling, one
    batch of batch.prompts_per_step prompts. With it (DAPO), groups whose responses all agree on
    the filter metric carry no advantage and are dropped, and further batches are drawn (each its
    own sampling seed; the sampler's position counts them, so a resume repeats them exactly) until
    prompts_per_step groups are kept or max_rounds is reached. Short of the target, the step
    trains on a multiple of the data-parallel size (ranks need whole groups), topped up with
    dropped groups only when no group has signal. Returns (prompts, their sequences with group
    ids into prompts, info); info["generated"] holds every response generated this step."""
    if hasattr(run.engine, "collect"):  # placement separate: the rollout ranks collected it
        return run.engine.collect(run, step, timer)
    ds, want = run.cfg.algo.dynamic_sampling, run.cfg.batch.prompts_per_step
    kept, dropped, generated = [], [], []  # (prompt, its sequences)
    for round_ in range(ds.max_rounds if ds.enable else 1):
        with timer("rollout"):
            prompts = run.sampler.next_batch(want)
            scorer = streaming_scorer(run)  # scores responses as they finish, during generation
            seqs = rollout(run, prompts, step, round_, scorer)
        with timer("reward"):  # what is left to score once generation ends
            reward(run, prompts, seqs, scorer.results() if scorer else None)
        generated += seqs
        if not ds.enable:
            return prompts, seqs, {"generated": generated}
        values = torch.tensor([float(s.correct if ds.metric == "correct" else s.reward) for s in seqs])
        signal = group_has_signal(values, torch.tensor([s.group for s in seqs]))
        by_group: dict[int, list] = {}
        for s in seqs:
            by_group.setdefault(s.group, []).append(s)
        for g, p in enumerate(prompts):
            (kept if signal[g] else dropped).append((p, by_group[g]))
        if len(kept) >= want:
            break
    take = kept[:want] if len(kept) >= want else kept[: len(kept) - len(kept) % run.dp]
    filler = dropped[: run.dp - len(take)] if not take else []
    prompts, seqs = [], []
    for g, (p, group) in enumerate(take + filler):
        prompts.append(p)
        for s in group:
            s.group = g
            seqs.append(s)
    info = {"generated": generated, "rounds": round_ + 1, "groups_generated": len(kept) + len(dropped),
            "groups_kept": len(kept), "groups_trained": len(take), "groups_filler": len(filler)}
    return prompts, seqs, info


def streaming_scorer(run):
    """A scorer the engine feeds as responses finish, where the engine streams (vLLM) and the
    reward runs in its worker pool (reward.workers not 0); else None: reward scores the batch."""
    from megatron_less.rewards.streaming import StreamingScorer

    if not run.engine.streams or run.cfg.reward.workers == 0:
        return None
    decode = lambda ids: run.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    return StreamingScorer(decode, num_workers=run.cfg.reward.workers, timeout=run.cfg.reward.timeout_s)


def rollout(run, prompts, step: int, round_: int = 0, scorer=None) -> list[B.Sequence]:
    """n responses per prompt (collective: every rank gets all of them); each handed to
    ``scorer`` as it finishes, under its index in the returned list."""
    r = run.cfg.rollout
    params = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_tokens=r.max_tokens,
                            seed=run.cfg.seed * 100_003 + step + round_ * 1_000_003, stop_token_ids=run.stop_ids)
    on_finish = None
    if scorer is not None:
        def on_finish(i, j, x):
            scorer.submit(i * r.n + j, x.token_ids, prompts[i].answer)
    out = run.engine.generate([p.token_ids for p in prompts], r.n, params, on_finish=on_finish)
    faults.kill_point("rollout" if round_ == 0 else "oversample", step)
    return [B.Sequence(g, prompts[g].token_ids, list(x.token_ids), list(x.logprobs), x.finish_reason)
            for g, responses in enumerate(out) for x in responses]  # fmt: skip


def reward(run, prompts, seqs: list[B.Sequence], scored: dict | None = None) -> None:
    """Math reward, then shared (collective): ``scored`` holds the verdicts this rank streamed
    ({index in seqs: verdict}; each response on one rank); without, each rank scores a slice."""
    from megatron_less.parallel import runtime
    from megatron_less.rewards.math import REASONS, score_batch

    if scored is not None:
        mine, results = list(scored), list(scored.values())
    else:
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = list(range(rank, len(seqs), world))
        texts = [run.tokenizer.decode(seqs[i].response, skip_special_tokens=True) for i in mine]
        results = score_batch(texts, [prompts[seqs[i].group].answer for i in mine],
                              num_workers=run.cfg.reward.workers, timeout=run.cfg.reward.timeout_s)
    codes = torch.zeros(len(seqs), 3)
    for i, res in zip(mine, results):
        codes[i] = torch.tensor([res.score, REASONS.index(res.reason) + 1, 1.0])
    codes = codes.to(runtime.device())  # the collective runs where NCCL can take it
    dist.all_reduce(codes)
    codes, count = codes[:, :2].cpu(), codes[:, 2].cpu()
    if not bool((count == 1).all()):
        bad = (count != 1).nonzero().flatten().tolist()
        raise RuntimeError(f"reward: responses {bad[:8]} were scored by {count[bad[:8]].tolist()} ranks, not one each")
    c = run.cfg
    lengths = torch.tensor([len(s.response) for s in seqs])
    penalty = (overlong_penalty(lengths, c.rollout.max_tokens, c.reward.overlong_buffer, c.reward.overlong_penalty)
               if c.reward.overlong_buffer else torch.zeros(len(seqs)))  # fmt: skip
    for s, (score, code), pen in zip(seqs, codes.tolist(), penalty.tolist()):
        s.scored, s.correct = REASONS[int(code) - 1], score > 0  # the verdict, before shaping
        s.reward, s.penalty = score + pen, pen


def place(run, seqs: list[B.Sequence]) -> tuple[list[B.Sequence], list[list[int]]]:
    """This data-parallel rank's sequences and, per mini-batch, their indices in that list."""
    from megatron.core import parallel_state as ps

    n_groups = max(s.group for s in seqs) + 1
    tokens = [0] * n_groups
    for s in seqs:
        tokens[s.group] += s.length
    plan = B.assign_groups(tokens, run.cfg.batch.mini_batch_prompts, run.dp)
    dp_rank = ps.get_data_parallel_rank()
    by_group: dict[int, list[B.Sequence]] = {}
    for s in seqs:
        by_group.setdefault(s.group, []).append(s)
    mine, minibatches = [], []
    for per_rank in plan:
        rows = []
        for g in per_rank[dp_rank]:
            rows += range(len(mine), len(mine) + len(by_group[g]))
            mine += by_group[g]
        minibatches.append(rows)
    return mine, minibatches


def microbatches(run, seqs, rows: list[int], per_token: dict) -> list[B.MicroBatch]:
    packed = run.cfg.batch.packing
    plan = B.plan_packs if packed else B.plan_microbatches
    plans = plan([seqs[i].length for i in rows], run.cfg.batch.micro_batch_tokens)
    multiple = sequence_multiple(run.policy.model[0])
    return [B.build_microbatch(seqs, [rows[k] for k in p], per_token, multiple=multiple, packed=packed) for p in plans]


def old_logprobs(run, seqs) -> dict[str, torch.Tensor]:
    """Per-token old log-probs and entropies (and reference log-probs with a KL term), no grad,
    beside the engine's rollout log-probs. Bypass (algo.old_logprobs: rollout): pi_old is the
    rollout's own log-probs, no forward pass, no entropies."""
    mbs = microbatches(run, seqs, list(range(len(seqs))), {})
    kw = dict(temperature=run.cfg.rollout.temperature, vocab_size=run.arch.vocab_size,
              fused_lm_head=run.cfg.model.fused_lm_head)
    rollout_lp = B.response_matrix([s.rollout_logprobs for s in seqs], torch.float32)
    if run.cfg.algo.old_logprobs == "rollout":
        out = {"old_logprobs": rollout_lp, "rollout_logprobs": rollout_lp}
    else:
        lp, ent = logprobs_and_entropy(run.policy.model, seqs, mbs, **kw)
        out = {"old_logprobs": lp, "entropy": ent, "rollout_logprobs": rollout_lp}
    if run.ref_model is not None:
        out["ref_logprobs"] = logprobs_and_entropy(run.ref_model, seqs, mbs, with_entropy=False, **kw)[0]
    return out


def advantages(run, seqs, per_token: dict) -> tuple[torch.Tensor, dict]:
    """Estimator then shaper from the registry, on this rank's whole groups."""
    a = run.cfg.algo
    mask = B.response_mask(seqs)
    data = {
        "token_ids": B.response_matrix([s.response for s in seqs], torch.long),
        "response_mask": mask,
        "correct": torch.tensor([s.correct for s in seqs]),
        "group_index": torch.tensor([s.group for s in seqs]),
    }
    if "entropy" in per_token:  # absent in bypass mode, where the config allows no shaper
        data["entropy"] = per_token["entropy"]
    rewards = torch.tensor([s.reward for s in seqs], dtype=torch.float32)
    adv, stats = compute_token_advantages(rewards, data["group_index"], data, estimator=a.advantage, shaper=a.shaper,
                                          estimator_kwargs=a.advantage_kwargs, shaper_kwargs=a.shaper_kwargs)
    return adv.float() * mask, dict(stats)


def correction(run, seqs, per_token: dict) -> dict[str, torch.Tensor]:
    """What the loss takes besides the advantages: ``loss_keep`` [N, T] (tokens left in the loss
    and its normaliser: the correction's rejection and overlong filtering) and, for an IS
    correction, ``is_weights`` [N, T] on the policy-gradient term (algos.rollout_correction)."""
    a = run.cfg.algo
    mask = B.response_mask(seqs)
    corr = apply_correction(a.correction, per_token["old_logprobs"], per_token["rollout_logprobs"], mask,
                            **a.correction_kwargs)
    keep = corr.keep & mask
    if a.overlong_filter:
        keep &= torch.tensor([s.finish_reason != "length" for s in seqs])[:, None]
    out = {"loss_keep": keep}
    if corr.weights is not None:
        out["is_weights"] = corr.weights.float() * keep
    return out


def update(run, seqs, minibatches: list[list[int]], per_token: dict) -> dict:
    """Mini-batch optimizer steps (collective). Returns summed metrics of the whole update.
    A loss's random choices (Clip-Cov) draw from one generator per (seed, step, DP rank): the
    ranks of a model replica choose alike, and a resume at any layout needs no RNG state."""
    from megatron.core import parallel_state as ps

    from megatron_less.algos.entropy_baselines import step_generator

    c = run.cfg
    spec = LossSpec(c.algo.policy_loss, dict(c.algo.loss_kwargs), c.algo.loss_agg_mode, c.rollout.temperature,
                    run.arch.vocab_size, c.rollout.max_tokens, c.algo.kl_coef, c.algo.kl_type, c.algo.entropy_coef,
                    c.model.fused_lm_head)
    keep = {k: per_token[k] for k in ("old_logprobs", "advantages", "ref_logprobs", "loss_keep", "is_weights")
            if k in per_token}  # fmt: skip
    hooks = faults.corrupt_update(run.policy.model, run.step + 1, keep)  # MLESS_FAULT only
    totals: dict[str, float] = {}
    generator = step_generator(c.seed, run.step + 1, ps.get_data_parallel_rank())
    for _ in range(c.batch.ppo_epochs):
        for rows in minibatches:
            mbs = microbatches(run, seqs, rows, keep)
            sums = train_minibatch(run.policy, mbs, spec, generator=generator)
            faults.kill_point("update", run.step + 1)
            sums = gather_sums(sums if _loss_rank() else {})
            loss = sums.get("_loss_sum", 0.0) / max(sums.get("_loss_count", 0.0), 1.0)
            stepped, norm = optimizer_step(run.policy, run.scheduler, math.isfinite(loss))
            run.counters["skipped_steps"] += not stepped
            padded = sum(m.tokens.numel() for m in mbs)
            real = sum(seqs[i].length for i in rows)
            for k, v in {**sums, "_loss": loss, "_grad_norm": norm, "_stepped": float(stepped), "_opt_steps": 1.0,
                         "_padded": float(padded), "_real": float(real)}.items():  # fmt: skip
                totals[k] = totals.get(k, 0.0) + v
    for h in hooks:
        h.remove()
    return totals


def _loss_rank() -> bool:
    """Ranks whose loss numbers count: the last pipeline stage, TP rank 0 (TP ranks agree)."""
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0


def gather_parts(local: dict) -> list[dict]:
    """Every rank's dict of numbers (collective over the world; small, once per mini-batch)."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return parts


def sum_parts(parts: list[dict]) -> dict:
    """Key-wise sum of the ranks' dicts (a key missing on a rank counts 0)."""
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def gather_sums(local: dict) -> dict:
    """Key-wise sum over the ranks that report (collective over the world)."""
    return sum_parts(gather_parts(local))


def sync_weights(run) -> dict:
    """The rollout engine sleeps through training (GPU) and gets the new weights before the next
    rollout. The sync wakes it: a sleeping vLLM engine has discarded its weights (level 2), so
    it takes its weights' memory back, loads every weight, and only then its KV cache."""
    return run.engine.sync_weights(run.policy.module)


def eval_due(cfg, step: int) -> bool:
    """Whether the run evaluates after ``step`` (0: before training)."""
    if step == 0:
        return cfg.eval.before_train
    return bool(cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.steps))


def evaluate(run, step: int) -> dict[str, float]:
    """The eval command's code on held-out benchmarks, generating with the rollout engine
    (collective; rank 0 scores, writes the report and returns the figures)."""
    from megatron_less.eval.generate import engine_generate_fn
    from megatron_less.eval.run import evaluate as run_benchmarks
    from megatron_less.eval.run import save_report

    if hasattr(run.engine, "evaluation"):  # placement separate: the rollout ranks evaluated
        return run.engine.evaluation(step) if dist.get_rank() == 0 else {}
    e = run.cfg.eval
    generate = engine_generate_fn(run.engine, run.tokenizer, run.stop_ids, seed=run.cfg.seed + step)
    report = run_benchmarks(generate, e.benchmarks, n=e.n, temperature=e.temperature, top_p=e.top_p,
                            max_tokens=e.max_tokens, template=e.template, tokenizer=run.tokenizer, limit=e.limit,
                            score=dist.get_rank() == 0, bootstrap=False)  # fmt: skip
    if report is None:
        return {}
    save_report(report, run.out_dir / "eval" / f"step_{step:06d}", plot=False)
    return {f"eval/{bench}/{k}": float(v) for bench, m in report["metrics"].items()
            for k, v in m.items() if isinstance(v, (int, float))}  # fmt: skip
