"""The GRPO (+ LESS) training loop: one screen, one named phase per line; what each phase does is
in phases.py, how the model is run in passes.py, what a run holds in setup.py."""

from __future__ import annotations

import torch.distributed as dist

from megatron_less.checkpoints import train_state
from megatron_less.parallel import placement
from megatron_less.trainer import phases, separate
from megatron_less.trainer.config import Config
from megatron_less.trainer.metrics import local_token_sums, mismatch_thresholds, step_metrics
from megatron_less.trainer.setup import build_run


def train(cfg: Config):
    """Every rank of the job calls this. Returns the run (``run.metrics``: the last step's)."""
    if cfg.rollout.placement == "separate" and placement.of_env(cfg.rollout.ranks).role == placement.ROLLOUT:
        return separate.serve(separate.build_side(cfg))  # this rank only generates (rollout ranks)
    run = build_run(cfg)  # resumes from the newest complete checkpoint when asked
    last = run.last_step
    if run.step == 0 and phases.eval_due(cfg, 0):
        run.logger.log_eval(0, phases.evaluate(run, 0))
    for step in range(run.step + 1, last + 1):
        t = phases.Timer()
        prompts, seqs, sampled = phases.collect(run, step, t)  # rollout + reward (rounds: dynamic sampling)
        run.engine.sleep()  # frees rollout memory for training (GPU; no-op elsewhere)
        mine, minibatches = phases.place(run, seqs)  # whole groups per data-parallel rank
        with t("old_logprobs"):
            per_token = phases.old_logprobs(run, mine)
        with t("advantages"):
            per_token["advantages"], stats = phases.advantages(run, mine, per_token)
            per_token.update(phases.correction(run, mine, per_token))  # mismatch correction, overlong filter
        with t("update"):
            upd = phases.update(run, mine, minibatches, per_token)
        with t("weight_sync"):
            sampled["sync"] = phases.sync_weights(run)
        run.step = step
        local = local_token_sums(mine, per_token, stats, report=_reports(), threshold=mismatch_thresholds(cfg.algo)[0])
        run.metrics = step_metrics(run, sampled, local, upd, dict(t))
        run.logger.log(step, run.metrics, _samples(run, prompts, mine, per_token, stats))
        if phases.eval_due(cfg, step):
            run.logger.log_eval(step, phases.evaluate(run, step))
        if train_state.due(cfg, step, last):
            train_state.save(run)
    if cfg.checkpoint.export_hf:
        run.logger.print(f"exported {train_state.export_hf(run)}")
    run.logger.close()
    shutdown = getattr(run.engine, "shutdown", None)
    if shutdown is not None:  # vLLM's groups (and with them the default group) go last
        shutdown()
    return run


def _reports() -> bool:
    """One rank per data-parallel replica reports its per-token sums (first stage, TP rank 0)."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage()


def _samples(run, prompts, seqs, per_token, stats) -> list[dict]:
    """A few whole rollouts from rank 0's groups, token by token, for the log."""
    if dist.get_rank() != 0:
        return []
    classes, entropy = stats.get("token_class"), per_token.get("entropy")
    keep = per_token["loss_keep"]
    out = []
    for i, s in enumerate(seqs[: run.cfg.log.rollouts_per_step]):
        r = len(s.response)
        out.append({
            "group": s.group, "prompt": prompts[s.group].text, "answer": prompts[s.group].answer,
            "response": run.tokenizer.decode(s.response, skip_special_tokens=True),
            "tokens": [run.tokenizer.decode([t]) for t in s.response], "token_ids": s.response,
            "reward": s.reward, "correct": s.correct, "scored": s.scored, "finish_reason": s.finish_reason,
            "penalty": s.penalty, "loss_excluded": not bool(keep[i, :r].any()),
            "entropy": entropy[i, :r].tolist() if entropy is not None else None,
            "advantage": per_token["advantages"][i, :r].tolist(),
            "rollout_logprobs": s.rollout_logprobs, "old_logprobs": per_token["old_logprobs"][i, :r].tolist(),
            "less_class": classes[i, :r].tolist() if classes is not None else None,
        })  # fmt: skip
    return out
