"""The two passes the loop makes through megatron's schedule: a no-grad one for per-token
log-probs and entropies (old policy, reference model), and the training one over a mini-batch.

The loss goes through megatron's per-token-loss path (``calculate_per_token_loss``): each
micro-batch returns the *sum* of its loss terms and the count they are averaged over (tokens for
token-mean, sequences for the seq-mean modes); megatron all-reduces the counts over DP and scales
the gradients by 1 / total after the DP reduction. So the normaliser is the whole optimizer
step's count over all micro-batches and ranks, not a mean of per-micro-batch means.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_less.algos import get_policy_loss
from megatron_less.models.packing import attention_kind, packed_inputs
from megatron_less.models.schedule import run_schedule
from megatron_less.ops import lm_head_logprob_entropy, vocab_parallel_logprob_entropy
from megatron_less.trainer.batch import MicroBatch, Sequence, to_response_layout


def _device(model_chunks) -> torch.device:
    return next(model_chunks[0].parameters()).device


def _shape(mbs: list[MicroBatch]) -> dict:
    return {"seq_length": max(m.tokens.shape[1] for m in mbs), "micro_batch_size": max(m.tokens.shape[0] for m in mbs)}


def _op(out, model, mb: MicroBatch, temperature: float, vocab_size: int, fused_lm_head: bool, *,
        with_entropy=True, entropy_grad=False):
    """Per-token log-probs (and entropies) of mb's targets from the last stage's output: final
    hidden states through the fused LM head (the logits never exist whole), or logits."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_attr_wrapped_model, get_model_config

    kw = dict(tp_group=ps.get_tensor_model_parallel_group(), temperature=temperature, vocab_size=vocab_size,
              with_entropy=with_entropy, entropy_grad=entropy_grad)
    target = mb.target.to(out.device)
    if fused_lm_head:
        weight = get_attr_wrapped_model(model, "output_weight")()
        # under sequence parallelism the model all-gathered `out`; that gather's backward sums dL/dh
        sp = get_model_config(model).sequence_parallel
        return lm_head_logprob_entropy(out[:, :-1], weight, target, sequence_parallel=sp, **kw)
    return vocab_parallel_logprob_entropy(out[:, :-1], target, **kw)


def _forward(model, mb: MicroBatch, device, fused_lm_head: bool):
    """The stage's forward: on the last stage final hidden states (fused LM head) or logits."""
    tokens = mb.tokens.to(device)
    if mb.lengths is not None:  # packed: the model sees where each sequence starts
        kw = packed_inputs(mb.lengths, tokens.shape[1], device, kind=attention_kind(model))
    else:
        kw = {"position_ids": torch.arange(tokens.shape[1], device=device).expand_as(tokens), "attention_mask": None}
    if fused_lm_head:
        kw["hidden_states"] = True
    return model(tokens, **kw)


@torch.no_grad()
def logprobs_and_entropy(model_chunks, seqs: list[Sequence], mbs: list[MicroBatch], *, temperature: float,
                         vocab_size: int, with_entropy: bool = True,
                         fused_lm_head: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of every response, [N, T_resp] float32 in response
    layout, on every rank of the model-parallel group (broadcast from the last stage as tensors)."""
    from megatron.core import parallel_state as ps

    width = max(len(s.response) for s in seqs)
    lp = torch.zeros(len(seqs), width)
    ent = torch.zeros(len(seqs), width) if with_entropy else None
    device = _device(model_chunks)

    def step(data_iter, model):
        mb = next(data_iter)
        out = _forward(model, mb, device, fused_lm_head)

        def collect(o):  # called on the last stage right after this micro-batch's forward
            l, h = _op(o, model, mb, temperature, vocab_size, fused_lm_head, with_entropy=with_entropy)
            to_response_layout(mb, l.float().cpu(), seqs, lp)
            if with_entropy:
                to_response_layout(mb, h.float().cpu(), seqs, ent)
            return o.new_zeros(()), {}

        return out, collect

    run_schedule(model_chunks, mbs, step, forward_only=True, **_shape(mbs))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        both = torch.stack([lp, ent if with_entropy else lp]).to(device)
        dist.broadcast(both, ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        lp, ent = both[0].cpu(), (both[1].cpu() if with_entropy else None)
    return lp, ent


@dataclass
class LossSpec:
    name: str
    kwargs: dict
    agg_mode: str
    temperature: float
    vocab_size: int
    max_response_len: int
    kl_coef: float = 0.0
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    fused_lm_head: bool = True  # hidden states through ops.lm_head_logprob_entropy, no logits


def train_minibatch(policy, mbs: list[MicroBatch], spec: LossSpec, *,
                    generator: torch.Generator | None = None) -> dict[str, float]:
    """Forward/backward over one mini-batch (gradients left in megatron's buffers). Returns sums
    of per-token metrics (weighted by each micro-batch's loss tokens) from the last stage, read
    from the device once, after the last micro-batch.

    ``generator``: what a loss that makes random choices (one with a ``generator`` keyword:
    Clip-Cov) draws from, micro-batch after micro-batch; the caller seeds it from (seed, step,
    data-parallel rank), so nothing here draws from the process RNGs."""
    from megatron_less.models.policy import forward_backward

    loss_fn = get_policy_loss(spec.name)
    kwargs = dict(spec.kwargs)
    if "generator" in inspect.signature(loss_fn).parameters:
        kwargs["generator"] = generator
    device = _device(policy.model)
    sums: dict = {}

    def step(data_iter, model):
        mb = next(data_iter)
        out = _forward(model, mb, device, spec.fused_lm_head)

        def loss(o):
            # the current entropy is logged by every loss and selects forking tokens; it carries
            # a gradient only when the entropy bonus is on
            lp, ent = _op(o, model, mb, spec.temperature, spec.vocab_size, spec.fused_lm_head,
                          entropy_grad=spec.entropy_coef != 0)
            x = {k: v.to(device) for k, v in mb.extra.items()}
            mask = mb.loss_mask.to(device)
            if "loss_keep" in x:  # rejected by the mismatch correction, or filtered as overlong
                mask = mask & x["loss_keep"]
            # counts of 1: each term comes back as a sum; megatron divides by the global count
            total, metrics = loss_fn(
                lp, x["old_logprobs"], x["advantages"], mask, **kwargs, loss_agg_mode=spec.agg_mode,
                global_num_tokens=1, global_num_seqs=1, max_response_len=spec.max_response_len,
                ref_log_prob=x.get("ref_logprobs"), kl_coef=spec.kl_coef, kl_type=spec.kl_type, entropy=ent,
                entropy_coef=spec.entropy_coef, rollout_is_weights=x.get("is_weights"),
            )  # fmt: skip
            # the loss's own count (forking tokens: the selected tokens, not every response token)
            count = metrics.pop("loss_count").to(torch.int)
            _accumulate(sums, metrics, mb.num_tokens, total, count)
            return total, count, {}

        return out, loss

    forward_backward(policy, mbs, step, **_shape(mbs))
    return read_sums(sums)


# Loss terms aggregated like the loss itself: with counts of 1 they come back as sums, and
# are divided by the step's loss count like the loss. Other metrics are micro-batch means.
AGGREGATED = ("pg_loss", "entropy", "kl_ref")


def _accumulate(sums, metrics, n_tok, total, count) -> None:
    """Adds one micro-batch's numbers into ``sums`` without reading them: tensors stay on the
    device (a host read is a device sync, a bubble in the 1F1B schedule), summed in float64 as
    the host's floats were; `read_sums` fetches them once per mini-batch."""
    for k, v in metrics.items():
        v = _f64(v)
        if k in AGGREGATED:
            sums["agg_" + k] = sums.get("agg_" + k, 0.0) + v
        else:  # weighted by tokens, so the step's figure is a token mean
            sums[k] = sums.get(k, 0.0) + v * n_tok
    sums["_tokens"] = sums.get("_tokens", 0.0) + n_tok
    sums["_loss_sum"] = sums.get("_loss_sum", 0.0) + _f64(total)
    sums["_loss_count"] = sums.get("_loss_count", 0.0) + _f64(count)


def _f64(v):
    return v.detach().to(torch.float64) if isinstance(v, torch.Tensor) else float(v)


def read_sums(sums: dict) -> dict[str, float]:
    """``sums`` as Python floats: every device value in one transfer (one sync)."""
    keys = [k for k, v in sums.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in sums.items() if k not in keys}
    if keys:
        device = sums[keys[0]].device
        values = torch.stack([sums[k].reshape(()).to(device) for k in keys]).tolist()
        out.update(zip(keys, values))
    return {k: out[k] for k in sums}


def optimizer_step(policy, scheduler, loss_finite: bool) -> tuple[bool, float]:
    """Megatron's optimizer step, split so that a non-finite loss or gradient norm skips the
    update (and the LR schedule) instead of writing NaN into the weights. Collective over the
    model-parallel group. Returns (stepped, grad_norm)."""
    opt = policy.optimizer
    found_inf = opt.prepare_grads()  # fp16 loss scaling's overflow check; False otherwise
    clip = opt.config.clip_grad
    norm = float(opt.clip_grad_norm(clip) if clip > 0 else opt.get_grad_norm())
    if found_inf or not loss_finite or not math.isfinite(norm):
        return False, norm
    opt.step_with_ready_grads()
    scheduler.step(increment=1)
    return True, norm
