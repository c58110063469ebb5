"""Rollout checks shared by the built-in sampler and the vLLM tests: recompute the log-probs of
sampled tokens with the Megatron policy itself (gathered logits, float64)."""

from __future__ import annotations

import torch


def recompute_logprobs(policy_chunks, arch, prompt, response, temperature):
    """Log-probs of ``response`` after ``prompt`` under the Megatron model at ``temperature``
    (0 means greedy, scored at temperature 1), on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_less.models.schedule import forward_logits

    tokens = torch.tensor([list(prompt) + list(response)])
    logits = forward_logits(policy_chunks, tokens)
    n = len(response)
    out = torch.zeros(n, dtype=torch.float64)
    if logits is not None:
        tp = ps.get_tensor_model_parallel_world_size()
        rows = logits[0, len(prompt) - 1 : len(prompt) - 1 + n].double()
        if tp > 1:
            shards = [torch.empty_like(rows) for _ in range(tp)]
            dist.all_gather(shards, rows.contiguous(), group=ps.get_tensor_model_parallel_group())
            rows = torch.cat(shards, -1)
        rows = rows[:, : arch.vocab_size] / (temperature or 1.0)
        out = torch.log_softmax(rows, -1).gather(1, torch.tensor(response).view(-1, 1)).view(-1)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(out, ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return out


def max_logprob_error(policy_chunks, arch, prompts, sampled, temperature) -> float:
    """Largest |engine log-prob - Megatron recomputation| over every sampled token."""
    worst = 0.0
    for p, rs in zip(prompts, sampled):
        for r in rs:
            ref = recompute_logprobs(policy_chunks, arch, p, r.token_ids, temperature)
            worst = max(worst, float((torch.tensor(r.logprobs, dtype=torch.float64) - ref).abs().max()))
    return worst
