"""Per-token log-prob of the target and full-vocabulary entropy from vocab-parallel logits.

Rank r of the TP group holds logits x[:, r*Vr:(r+1)*Vr] (Vr = V/TP); z = x / T are the tempered
logits. Per token we need

    logZ = log sum_j exp(z_j)            logprob = z_t - logZ
    H    = -sum_j p_j log p_j = logZ - sum_j p_j z_j,        p = softmax(z)

Forward. Each rank walks its shard in chunks of tokens and keeps, per token, four numbers shifted
to its *local* max m_r:  S0_r = sum exp(z - m_r),  S1_r = sum exp(z - m_r)(z - m_r),  m_r, and
z_t if it owns the target (else 0). Local shifts mean no rank waits for another during the
pass, so the whole call needs ONE collective at the end: an all-gather of a [T, 4] tensor. With
M = max_r m_r and w_r = exp(m_r - M) (the standard online-softmax merge):

    S0 = sum_r w_r S0_r,   S1 = sum_r w_r (S1_r + (m_r - M) S0_r)
    logZ = M + log S0,     H = log S0 - S1 / S0,    logprob = (z_t - M) - log S0

The merge runs in float64 on [T] tensors (free). Confident tokens (p_max -> 1, S0 -> 1) would
lose everything to rounding in fp32 (S0 = 1 + tiny): so S0 - 1 is carried instead of S0 (the
max's exp(0) = 1 removed before summing), log S0 = log1p(S0 - 1), and the m_r and z_t are raw
fp32 logits (division by T happens in float64). Entropies down to ~1e-7 keep ~1e-7 relative
accuracy; a naive fp32 pass gets them to ~1e-7 absolute.

Backward. With l = log p = z - logZ, for upstream gradients g (log-prob) and h (entropy):

    d logprob / dz_j = 1[j=t] - p_j,     d H / dz_j = -p_j (l_j + H)
    d/dx_j = (g 1[j=t] - p_j (a + b l_j)) / T,   a = g + h H,  b = h

Everything on the right is local given the saved per-token logZ and H, so backward does no
communication; it recomputes p chunk by chunk instead of storing the [T, V] softmax. T logZ is
split into an fp32 head C and a float64 tail (l = (x - C)/T - tail), the tail folded into the
per-token a, b, so rounding logZ to fp32 never shifts every p_j at once; the target's entry is
written from float64 (1 - p_t = -expm1(logprob)), exact where fp32 1 - p_t would cancel.

Two implementations of the per-chunk passes, same math. Eager (default on CPU): a float32
workspace of two [chunk, Vr] buffers (d = z - m and exp(d) in forward; l and p in backward, where
fp32 input lets p live in the gradient itself), reused across chunks; every op in place. Fused
(default on CUDA when triton is there): the same two functions under torch.compile, which turns
each into one or two kernels that read the logits and keep the rest in registers - no
workspace, so no chunking. Either way: beyond the input, O(T) stats (and the gradient in
backward). The input is never written. Targets outside [0, V) give a meaningless log-prob
(z_t = 0); mask such tokens out of the loss as usual.

Masked logits. A -inf logit (a banned token, a masked column; also finfo.min, which / T may
turn into -inf) has p = 0 and contributes 0 * log 0 = 0 to the entropy and 0 to every gradient.
Computed naively that term is -inf * 0 = NaN, so d = z - m (forward) and l (backward) are
floored at _EXP_FLOOR, below which exp is 0 even in float64: no value changes, the products
stay 0. A shard whose columns are all -inf has no max: it shifts by 0 instead and reports
m_r = -inf, S0_r = S1_r = 0, like an all-padding shard. A -inf target gets log-prob -inf and
a finite gradient. (A token whose every logit is -inf has no distribution: NaN.)

Padded vocabulary. Megatron pads V to a multiple of 128 * TP; the padded columns are real
columns of the logits (0 after a checkpoint load) but not tokens. ``vocab_size`` = the real V:
global ids >= vocab_size are left out of everything - max, sums, entropy - and get a zero
gradient, without copying the logits. Rank r sees only its first valid_r = clamp(vocab_size -
r Vr, 0, Vr) columns: the eager path reads x[:, :valid_r] into its workspace (the rest of the
gradient is zeroed once); the fused kernels take valid_r as a tensor (no recompile per value)
and mask with a column < valid_r select. A rank whose whole shard is padding (valid_r = 0, e.g.
V = 250 at TP4 in shards of 128: ranks 2 and 3) runs no kernel and contributes m_r = -inf,
S0_r = S1_r = 0 to the all-gather: w_r = 0, and its shift (m_r - M) = -inf is replaced by 0
before it multiplies S0_r = 0 (-inf * 0 would be NaN). Targets >= vocab_size are invalid like
those outside [0, V): z_t = 0 and no gradient is written for them.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

# Per buffer, eager path. CPU: two buffers that fit the L2 cache beat bigger ones (each chunk
# makes ~8 passes over its buffer). CUDA: big enough that kernel launches are noise next to the
# memory traffic, small next to [T, V] logits (16k x 152k bf16 = 5 GB).
_WORKSPACE_BYTES = {"cpu": 1 << 20, "cuda": 256 << 20}

# exp(x) == 0 below this, in float32 and float64: flooring there changes no probability
_EXP_FLOOR = -1000.0


def default_chunk_size(vocab_per_rank: int, device: torch.device) -> int:
    budget = _WORKSPACE_BYTES.get(device.type, _WORKSPACE_BYTES["cuda"])
    return max(1, budget // (4 * vocab_per_rank))


def group_info(group) -> tuple[int, int]:
    """(size, rank) of the tensor-parallel group; (1, 0) without one (shared with ops.lm_head)."""
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _local_target(target: torch.Tensor, rank: int, vr: int, valid: int):
    """Local column of the target (clamped into the shard) and whether this rank owns it: only
    real columns (< valid) count, so a target in the padding writes no gradient anywhere."""
    local = target - rank * vr
    owned = (local >= 0) & (local < valid)
    return local.clamp(0, vr - 1).unsqueeze(-1), owned


def valid_columns(vocab_size: int | None, rank: int, vr: int) -> int:
    """How many of this rank's columns are real tokens (the rest is vocabulary padding)."""
    if vocab_size is None:
        return vr
    return min(max(vocab_size - rank * vr, 0), vr)


# Per-token stats columns: max x, S0, S0 with the exact 1s dropped, S1 (all relative to the local
# max), x_t. frac() zeroes exp(0) = 1 at the max (and at ties): S0 - 1 stays accurate when S0 ~ 1.


def _stats_eager(x, tgt, temperature, chunk, with_entropy, valid):
    n = x.shape[0]
    stats = torch.zeros(n, 5, dtype=torch.float32, device=x.device)
    d = torch.empty(min(chunk, n), valid, dtype=torch.float32, device=x.device)
    e = torch.empty_like(d)
    for s in range(0, n, chunk):
        xc = x[s : s + chunk, :valid]  # the real columns only: a strided view, no copy
        k = xc.shape[0]
        dc, ec, st = d[:k], e[:k], stats[s : s + k]
        dc.copy_(xc)  # upcast first: mixed-dtype ops make hidden fp32 copies on CPU
        mx = dc.amax(-1, keepdim=True)
        dc.sub_(_finite_shift(mx))  # exact near the max (Sterbenz)
        if temperature != 1.0:
            dc.div_(temperature)  # not * 1/T: an extra rounding, amplified by exp
        st[:, 0] = mx.squeeze(-1)
        torch.exp(dc, out=ec)
        st[:, 1] = ec.sum(-1)
        st[:, 2] = ec.frac_().sum(-1)
        if with_entropy:
            # the 1s had d = 0: nothing lost; the floor: -inf * exp(-inf) would be NaN
            st[:, 3] = dc.clamp_(min=_EXP_FLOOR).mul_(ec).sum(-1)
        st[:, 4] = x[s : s + k].gather(-1, tgt[s : s + k]).squeeze(-1).float()
    return stats


def _finite_shift(mx):
    """The per-token max to shift by; 0 where every column is -inf (no max; all exp are 0)."""
    return torch.where(mx > -torch.inf, mx, 0.0)


def _real(x, consts):
    """[Vr] mask of this shard's real (non-padding) columns; consts[2] holds their count."""
    return torch.arange(x.shape[-1], device=x.device) < consts[2]


def _stats_fused(x, tgt, consts):
    z = x.float()
    real = _real(x, consts)
    mx = torch.where(real, z, -torch.inf).amax(-1, keepdim=True)
    d = torch.where(real, _tempered(z - _finite_shift(mx), consts), -torch.inf)  # padding: exp(d) = 0
    e = torch.exp(d)
    f = torch.frac(e)
    # float64 accumulators: free in a fused reduction, and a compiled reduction sums in a
    # plain per-lane loop (CPU) rather than torch.sum's cascade - 1e-6 off at 4k+ terms
    sums = [v.double().sum(-1, keepdim=True) for v in (e, f, torch.where(real, d * f, 0.0))]
    return torch.cat([mx.double()] + sums + [x.gather(-1, tgt).double()], -1)


def _grad_eager(x, big_c, a, b, temperature, chunk, valid):
    """p * (a + b l) with l = (x - C) / T, p = exp(l); b None: p * a. Zero past column valid."""
    n, vr = x.shape
    grad = torch.empty_like(x)
    if valid < vr:
        grad[:, valid:].zero_()
    fp32 = x.dtype == torch.float32
    l_buf = torch.empty(min(chunk, n), valid, dtype=torch.float32, device=x.device)
    p_buf = None if fp32 else torch.empty_like(l_buf)
    for s in range(0, n, chunk):
        xc = x[s : s + chunk, :valid]
        k = xc.shape[0]
        lc = l_buf[:k]
        pc = grad[s : s + k, :valid] if fp32 else p_buf[:k]
        lc.copy_(xc).sub_(big_c[s : s + k])
        if temperature != 1.0:
            lc.div_(temperature)
        if b is not None:
            lc.clamp_(min=_EXP_FLOOR)  # p = 0 where l = -inf: p * b * l must be 0, not NaN
        torch.exp(lc, out=pc)
        if b is not None:
            pc.mul_(lc.mul_(b[s : s + k]).add_(a[s : s + k]))  # addcmul is 3x slower on CPU
        else:
            pc.mul_(a[s : s + k])
        if not fp32:
            grad[s : s + k, :valid].copy_(pc)
    return grad


def _grad_fused(x, big_c, a, b, consts):
    l = _tempered(x.float() - big_c, consts)
    # a select, not a multiply: exp of a junk padding column may be inf
    return torch.where(_real(x, consts), torch.exp(l) * (a + b * l), 0.0).to(x.dtype)


_compiled: dict = {}


def _consts(temperature: float, valid: int, like: torch.Tensor) -> torch.Tensor:
    """The fused kernels' scalars, one fp32 tensor so that no value recompiles and one copy
    reaches the device: [hi, lo, valid]. 1/T as a pair hi + lo: compilers turn / T into
    * fl(1/T), a *systematic* relative error that exp amplifies by |z| (1e-6 at |z| ~ 20);
    (v * hi + v * lo) is as good as a correctly rounded division. valid: the count of real
    columns (exact in fp32 below 2^24)."""
    hi = torch.tensor(1.0 / temperature, dtype=torch.float32)
    lo = torch.tensor(1.0 / temperature - hi.double().item(), dtype=torch.float32)
    return torch.stack([hi, lo, torch.tensor(float(valid))]).to(like.device)


def _tempered(v, consts):
    """v / T as v * hi + v * lo (consts[:2]), floored at _EXP_FLOOR (see Masked logits). The
    inner floor keeps -inf out of v * lo: lo may be 0 (-inf * 0) or of the other sign (-inf + inf)."""
    v = v.clamp_min(torch.finfo(torch.float32).min)
    return (v * consts[0] + v * consts[1]).clamp_min(_EXP_FLOOR)


def _fused(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def fused_available(device: torch.device) -> bool:
    """Whether ``fused=None`` picks the compiled kernels: CUDA with triton importable."""
    if device.type != "cuda" or _compiled.get("broken"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _run(fused, fused_fn, eager_fn, eager_args, fused_args, chunk):
    """fused_fn over row chunks (all rows by default); fused=None means 'auto': a compile
    failure there falls back to eager, once, loudly."""
    if fused or fused is None:
        try:
            fn, n = _fused(fused_fn), fused_args[0].shape[0]
            if chunk >= n:
                return fn(*fused_args)
            out = None
            for s in range(0, n, chunk):  # into one output: torch.cat would hold it twice
                part = fn(*[v if v is fused_args[-1] else v[s : s + chunk] for v in fused_args])
                if out is None:
                    out = part.new_empty((n, *part.shape[1:]))
                out[s : s + part.shape[0]] = part
                del part  # else two chunks are alive while the next one is computed
            return out
        except Exception as exc:  # inductor raises many kinds
            if fused:
                raise
            _compiled["broken"] = True
            warnings.warn(f"vocab_parallel: torch.compile failed ({exc!r:.200}); using eager kernels")
    return eager_fn(*eager_args)


def shard_stats(x, target, rank, valid, temperature, chunk, with_entropy, fused):
    """[n, 4] float64 per-token stats of this rank's logits ``x`` [n, Vr] (see Forward): local
    max, S0 - 1, S1, and x_t where this rank owns the target (else 0). No communication."""
    tgt, owned = _local_target(target, rank, x.shape[-1], valid)
    if valid == 0:  # all padding: no max, empty sums (S0 - 1 = -1 below, w_r = 0 in the merge)
        stats = x.new_zeros(x.shape[0], 5, dtype=torch.float64)
        stats[:, 0] = -torch.inf
    else:
        stats = _run(fused, _stats_fused, _stats_eager, (x, tgt, temperature, chunk, with_entropy, valid),
                     (x, tgt, _consts(temperature, valid, x)), chunk).double()
    ones = torch.round(stats[:, 1] - stats[:, 2])  # >= 1 (the max and its ties); 0 if valid = 0
    return torch.stack([stats[:, 0], stats[:, 2] + (ones - 1), stats[:, 3],
                        torch.where(owned, stats[:, 4], 0.0)], -1)


def merge_stats(stats, group, temperature, with_entropy):
    """The one collective (an all-gather of [n, 4]) and the merge: float64 (logprob, entropy,
    M, log S0) per token; entropy is 0 without ``with_entropy``."""
    tp, _ = group_info(group)
    if tp > 1:
        parts = [torch.empty_like(stats) for _ in range(tp)]
        dist.all_gather(parts, stats, group=group)
        all_stats = torch.stack(parts)
    else:
        all_stats = stats.unsqueeze(0)
    mx, s0m1, s1, xt = all_stats.unbind(-1)  # each [tp, n]
    big_mx = mx.amax(0)
    shift = (mx - big_mx) / temperature  # m_r - M
    w = torch.exp(shift)  # exactly 1 on the rank(s) holding the max
    shift = torch.where(w > 0, shift, 0.0)  # w = 0 terms vanish; -inf (all padding) * 0 = NaN
    s0m1_sum = (w * s0m1).sum(0) + (w.sum(0) - 1)
    log_s0 = torch.log1p(s0m1_sum)
    # not z_t - logZ: at the argmax this is exactly 0 - log_s0, however small
    logprob = (xt.sum(0) - big_mx) / temperature - log_s0
    if with_entropy:
        s1_sum = (w * (s1 + shift * (1 + s0m1))).sum(0)
        ent = log_s0 - s1_sum / (1 + s0m1_sum)
    else:
        ent = torch.zeros_like(log_s0)
    return logprob, ent, big_mx, log_s0


def logits_grad(x, target, rank, valid, saved, g_lp, g_h, temperature, chunk, fused):
    """Gradient of the loss w.r.t. this rank's logits ``x`` [n, Vr], in x's dtype, from the
    upstream (g_lp, g_h) (None: no gradient) and ``saved`` = merge_stats' float64 (logprob,
    entropy, M, log S0) for these rows. No communication."""
    logprob, ent, big_mx, log_s0 = saved
    if valid == 0:
        return torch.zeros_like(x)
    t = temperature
    tgt, owned = _local_target(target, rank, x.shape[-1], valid)
    g = g_lp.double() if g_lp is not None else torch.zeros_like(ent)
    h = g_h.double() if g_h is not None else torch.zeros_like(ent)
    # l = z - logZ = (x - C) / T - c_lo with C = fp32(T logZ): x - C is exact near the top
    # (z = x / T itself would round); the float64 tail c_lo and -1/T fold into a and b.
    big_c = (big_mx + t * log_s0).float()
    c_lo = ((big_mx - big_c.double()) + t * log_s0) / t
    corr = torch.exp(-c_lo)
    a = (-(g + h * ent - h * c_lo) * corr / t).float().unsqueeze(-1)
    b = (-h * corr / t).float().unsqueeze(-1)
    big_c = big_c.unsqueeze(-1)
    grad = _run(fused, _grad_fused, _grad_eager,
                (x, big_c, a, b if g_h is not None else None, t, chunk, valid),
                (x, big_c, a, b, _consts(t, valid, x)), chunk)
    # The target's entry from float64: 1 - p_t = -expm1(logprob) cancels in fp32 when p_t ~ 1.
    lp_f = logprob.clamp(min=_EXP_FLOOR)  # a -inf target: p_t (l_t + H) = 0, not NaN
    at_t = (-g * torch.expm1(logprob) - h * torch.exp(lp_f) * (lp_f + ent)) / t
    rows = owned.nonzero().squeeze(-1)
    grad[rows, tgt[rows, 0]] = at_t[rows].to(grad.dtype)
    return grad


def check_vocab_size(vocab_size, vr, group):
    """The op's vocab_size, validated against the padded total; None when nothing is padding."""
    if vocab_size is None:
        return None
    total = group_info(group)[0] * vr
    if not 0 < vocab_size <= total:
        raise ValueError(f"vocab_size must be in [1, {total}] (the padded vocabulary), got {vocab_size}")
    return None if vocab_size == total else int(vocab_size)


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, group, temperature, chunk, with_entropy, entropy_grad, fused, vocab_size):
        ctx.set_materialize_grads(False)
        _, rank = group_info(group)
        valid = valid_columns(vocab_size, rank, x.shape[-1])
        stats = shard_stats(x, target, rank, valid, temperature, chunk, with_entropy, fused)
        logprob, ent, big_mx, log_s0 = merge_stats(stats, group, temperature, with_entropy)
        ctx.temperature, ctx.chunk, ctx.rank, ctx.fused, ctx.valid = temperature, chunk, rank, fused, valid
        ctx.entropy_grad = with_entropy and entropy_grad
        ctx.save_for_backward(x, target, logprob, ent, big_mx, log_s0)
        out_lp, out_h = logprob.float(), ent.float()
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(out_h)
        return out_lp, out_h

    @staticmethod
    def backward(ctx, g_lp, g_h):
        x, target, *saved = ctx.saved_tensors
        if not ctx.entropy_grad:
            g_h = None
        if g_lp is None and g_h is None:
            return (None,) * 9
        grad = logits_grad(x, target, ctx.rank, ctx.valid, saved, g_lp, g_h, ctx.temperature, ctx.chunk, ctx.fused)
        return grad, None, None, None, None, None, None, None, None


def vocab_parallel_logprob_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group=None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = True,
    entropy_grad: bool = True,
    fused: bool | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``target`` and entropy of softmax(logits / temperature), float32, shape [...].

    ``logits`` [..., V/TP] is this rank's vocabulary shard (rank r of ``tp_group`` holds ids
    [r*V/TP, (r+1)*V/TP)); ``tp_group=None`` means it is the whole vocabulary. ``target`` holds
    global ids. Any float dtype; math in float32, gradient in the input's dtype.
    ``entropy_grad=False`` returns a detached entropy and a backward that only pays for the
    log-prob. ``with_entropy=False`` skips the entropy and returns None for it.
    ``fused``: torch.compile'd kernels (None: on CUDA when triton is importable). ``chunk_size``
    tokens are processed at a time (eager default: 1 MiB fp32 buffers on CPU, 256 MiB on CUDA;
    fused default: all tokens at once, as it needs no workspace).
    ``vocab_size``: the real vocabulary size when the V columns include padding (Megatron pads V
    to a multiple of 128 * TP): global ids >= vocab_size are no tokens - left out of logZ and
    entropy, zero gradient - and are invalid targets. None: every column is a token.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} != logits shape {tuple(logits.shape[:-1])}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    vr = logits.shape[-1]
    vocab_size = check_vocab_size(vocab_size, vr, tp_group)
    if fused is None and not fused_available(logits.device):
        fused = False
    lead = logits.shape[:-1]
    x = logits.reshape(-1, vr)
    if x.shape[0] == 0:
        empty = logits.new_zeros(lead, dtype=torch.float32)
        return empty, (empty.clone() if with_entropy else None)
    chunk = chunk_size or (x.shape[0] if fused is not False else default_chunk_size(vr, logits.device))
    args = (tp_group, float(temperature), int(chunk), with_entropy, entropy_grad, fused, vocab_size)
    lp, ent = _LogprobEntropy.apply(x, target.reshape(-1).long(), *args)
    return lp.view(lead), (ent.view(lead) if with_entropy else None)
