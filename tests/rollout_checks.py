"""Rollout checks shared by the built-in sampler and the vLLM tests: recompute the log-probs of
sampled tokens with the Megatron policy itself (gathered logits, float64)."""

from __future__ import annotations

import torch


def nucleus_logprobs(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logp`` [N, V] renormalised over each row's top-p nucleus (-inf outside it): what an
    engine reporting log-probs after truncation would return. Keeps the tokens before the
    cumulative mass reaches top_p, as both samplers do."""
    sorted_lp, order = logp.sort(-1, descending=True)
    p = sorted_lp.exp()
    kept = torch.where(p.cumsum(-1) - p >= top_p, float("-inf"), sorted_lp)
    return torch.empty_like(logp).scatter_(-1, order, kept - kept.logsumexp(-1, keepdim=True))


def recompute_logprobs(policy_chunks, arch, prompt, response, temperature, top_p=1.0):
    """Log-probs of ``response`` after ``prompt`` under the Megatron model at ``temperature``
    (0 means greedy, scored at temperature 1) over the full vocabulary, on every rank; with
    ``top_p`` < 1, renormalised over the nucleus instead (the definition the engines must NOT
    follow: tests use it to show a check can tell the two apart)."""
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
        rows = torch.log_softmax(rows[:, : arch.vocab_size] / (temperature or 1.0), -1)
        if top_p < 1.0:
            rows = nucleus_logprobs(rows, top_p)
        out = rows.gather(1, torch.tensor(response).view(-1, 1)).view(-1)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(out, ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return out


def max_logprob_error(policy_chunks, arch, prompts, sampled, temperature, top_p=1.0) -> float:
    """Largest |engine log-prob - Megatron recomputation| over every sampled token (``top_p``:
    see recompute_logprobs)."""
    worst = 0.0
    for p, rs in zip(prompts, sampled):
        for r in rs:
            ref = recompute_logprobs(policy_chunks, arch, p, r.token_ids, temperature, top_p)
            worst = max(worst, float((torch.tensor(r.logprobs, dtype=torch.float64) - ref).abs().max()))
    return worst
