"""The LM head fused with the vocab-parallel log-prob + entropy: the logits never exist whole.

``lm_head_logprob_entropy(hidden [T, H], weight [V/TP, H], target [T])`` gives what
``vocab_parallel_logprob_entropy(hidden @ weight.T, target)`` gives, with gradients for hidden
and weight, but computes the logits one tile of tokens at a time and drops each tile at once,
in forward and again in backward (recomputed there: one extra [tile, H] x [H, V/TP] matmul per
tile instead of keeping [T, V/TP] logits and their gradient, 2 x 10 GB in fp32 at 16k x 152k).

The math per tile is the vocab-parallel op's own (``vocab_parallel.shard_stats``, ``merge_stats``,
``logits_grad``): same stats, same single collective in forward (one all-gather of [T, 4] over
the TP group, after every tile), same float64 merge, same handling of padded vocabularies
(``vocab_size``) and temperature. Eager on CPU; on CUDA the per-tile stats and gradient
functions run under torch.compile (``fused``), the matmuls stay cuBLAS.

Backward, per tile: recompute x = h W^T, G = dL/dx (local, no communication), then
d_hidden = G W and d_weight += G^T h. d_weight accumulates over tiles, in place, in a float32
buffer (bf16 accumulation loses the small late terms; no per-tile [V/TP, H] product is ever
allocated); d_hidden rows each come from one matmul over the whole shard, then one all-reduce
over the TP group in float32 - each rank holds only its vocabulary shard's part, exactly as
megatron's ColumnParallelLinear all-reduces its input gradient. The caller passes the full
(replicated) hidden states. Under sequence parallelism it all-gathers them with megatron's
``gather_from_sequence_parallel_region``, whose backward reduce-scatters; then
``sequence_parallel=True`` leaves d_hidden as this rank's part (ColumnParallelLinear's SP path:
one reduce-scatter instead of an all-reduce).

Tied embeddings: pass the embedding parameter itself as ``weight``; its gradient is returned
like any input's, so autograd adds it to the embedding's own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_less.ops.vocab_parallel import (
    group_info,
    valid_columns,
    check_vocab_size,
    default_chunk_size,
    fused_available,
    logits_grad,
    merge_stats,
    shard_stats,
)

# Bytes of one [tile, V/TP] float32 logits tile. CPU: ~200 tokens at 152k, where the per-tile
# matmuls run near the speed of one big one; far below a [T, V] buffer. CUDA: big enough that a
# tile's matmul fills the GPU (~400 tokens at 152k), small next to 16k x 152k fp32 logits (10 GB).
_TILE_BYTES = {"cpu": 128 << 20, "cuda": 256 << 20}

_MM_F32: dict = {}


def default_tile_tokens(vocab_per_rank: int, device: torch.device) -> int:
    budget = _TILE_BYTES.get(device.type, _TILE_BYTES["cuda"])
    return max(1, budget // (4 * vocab_per_rank))


# Bytes of the fp32 product block when a bf16 product is added in row blocks (below).
_BLOCK_BYTES = 64 << 20


def _mm_into(dst, a, b, accumulate):
    """dst (float32) = or += a @ b, with no [dst]-sized temporary when accumulating (d_weight:
    [V/TP, H], ~2 GB fp32 at 7B TP1, once per tile). fp32 inputs write straight into dst;
    bf16/fp16 ones accumulate in place through cuBLAS's out_dtype addmm where torch has it (fp32
    `self` allowed); else on CPU (no mixed-dtype addmm, no out_dtype mm) from the tile operands
    cast to fp32 - a's [V/TP, tile] is the size of one fp32 logits tile, b's [tile, H] smaller
    still - and elsewhere (bf16 matmuls kept) in row blocks of at most _BLOCK_BYTES."""
    if a.dtype == torch.float32:
        if accumulate:
            dst.addmm_(a, b)
        else:
            torch.mm(a, b, out=dst)
    elif accumulate:
        if _addmm_f32_into(dst, a, b):
            return
        if a.device.type == "cpu":
            dst.addmm_(a.float(), b.float())
        else:
            _add_in_row_blocks(dst, a, b, max(1, _BLOCK_BYTES // (4 * dst.shape[1])))
    else:  # d_hidden rows: [tile, H], small; b (the weight) is never cast whole
        dst.copy_(_mm_f32(a, b))


def _add_in_row_blocks(dst, a, b, rows: int) -> None:
    """dst += a @ b, `rows` rows of the fp32 product at a time."""
    for r in range(0, dst.shape[0], rows):
        dst[r : r + rows] += _mm_f32(a[r : r + rows], b)


def _addmm_f32_into(dst, a, b) -> bool:
    """dst += a @ b in place with fp32 accumulation and output for bf16/fp16 a, b (cuBLAS's
    out_dtype addmm); False where torch has no such kernel for the device."""
    key = ("addmm", a.device.type)
    if _MM_F32.get(key, True):
        try:
            torch.addmm(dst, a, b, out_dtype=torch.float32, out=dst)
            return True
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_F32[key] = False  # e.g. CPU: no addmm.dtype_out kernel
    return False


def _mm_f32(a, b):
    """a @ b with a float32 result for bf16/fp16: cuBLAS's out_dtype variant where torch has it
    (accumulates and returns fp32: nothing rounded to bf16); else one rounding per entry."""
    key = a.device.type
    if _MM_F32.get(key, True):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_F32[key] = False  # e.g. CPU: no mm.dtype kernel
    return (a @ b).float()


class _LMHeadLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, group, temperature, tile, with_entropy, entropy_grad, fused,
                vocab_size, reduce_hidden_grad):
        ctx.set_materialize_grads(False)
        _, rank = group_info(group)
        n, vr = hidden.shape[0], weight.shape[0]
        valid = valid_columns(vocab_size, rank, vr)
        inner = tile if fused is not False else default_chunk_size(vr, hidden.device)
        stats = hidden.new_empty(n, 4, dtype=torch.float64)
        for s in range(0, n, tile):
            x = hidden[s : s + tile] @ weight.t()  # the only [tile, V/TP] buffer; dropped next turn
            stats[s : s + tile] = shard_stats(x, target[s : s + tile], rank, valid, temperature, inner,
                                              with_entropy, fused)
            del x
        saved = merge_stats(stats, group, temperature, with_entropy)
        ctx.group, ctx.temperature, ctx.tile, ctx.inner, ctx.rank = group, temperature, tile, inner, rank
        ctx.fused, ctx.valid, ctx.entropy_grad = fused, valid, with_entropy and entropy_grad
        ctx.reduce_hidden_grad = reduce_hidden_grad
        ctx.save_for_backward(hidden, weight, target, *saved)
        out_lp, out_h = saved[0].float(), saved[1].float()
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(out_h)
        return out_lp, out_h

    @staticmethod
    def backward(ctx, g_lp, g_h):
        hidden, weight, target, *saved = ctx.saved_tensors
        if not ctx.entropy_grad:
            g_h = None
        want_h, want_w = ctx.needs_input_grad[:2]
        if (g_lp is None and g_h is None) or not (want_h or want_w):
            return (None,) * 11
        n, tile = hidden.shape[0], ctx.tile
        d_h = hidden.new_empty(n, hidden.shape[1], dtype=torch.float32) if want_h else None
        d_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for s in range(0, n, tile):
            rows = slice(s, s + tile)
            h = hidden[rows]
            x = h @ weight.t()
            g = logits_grad(x, target[rows], ctx.rank, ctx.valid, [v[rows] for v in saved],
                            None if g_lp is None else g_lp[rows], None if g_h is None else g_h[rows],
                            ctx.temperature, ctx.inner, ctx.fused)
            del x
            if want_h:
                _mm_into(d_h[rows], g, weight, accumulate=False)
            if want_w:
                _mm_into(d_w, g.t(), h, accumulate=True)
            del g
        if want_h and ctx.reduce_hidden_grad and group_info(ctx.group)[0] > 1:
            dist.all_reduce(d_h, group=ctx.group)  # every vocabulary shard's part of dL/dh
        return (d_h.to(hidden.dtype) if want_h else None, d_w.to(weight.dtype) if want_w else None,
                None, None, None, None, None, None, None, None, None)


def lm_head_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group=None,
    temperature: float = 1.0,
    tile_tokens: int | None = None,
    with_entropy: bool = True,
    entropy_grad: bool = True,
    fused: bool | None = None,
    vocab_size: int | None = None,
    sequence_parallel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``target`` and entropy of softmax(hidden @ weight.T / temperature), float32,
    shape [...], without materialising the logits.

    ``hidden`` [..., H]: final hidden states, the same on every rank of ``tp_group``.
    ``weight`` [V/TP, H]: this rank's rows of the output layer (or the tied embedding); rank r
    holds ids [r*V/TP, (r+1)*V/TP). ``target`` [...] holds global ids. ``tile_tokens``: tokens
    per logits tile (default: a 128 MiB fp32 tile on CPU, 256 MiB on CUDA). The other arguments
    are those of ``vocab_parallel_logprob_entropy``. Gradients: hidden (all-reduced over
    ``tp_group``) and weight (this rank's rows), in their dtypes, accumulated in float32.
    ``sequence_parallel``: ``hidden`` came through megatron's sequence-parallel all-gather, whose
    backward reduce-scatters: the hidden gradient is left as this rank's part, not all-reduced.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share a float dtype, got {hidden.dtype} and {weight.dtype}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden {tuple(hidden.shape)} ([V/TP, H])")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} != hidden shape {tuple(hidden.shape[:-1])}")
    if tile_tokens is not None and tile_tokens < 1:
        raise ValueError(f"tile_tokens must be positive, got {tile_tokens}")
    vr = weight.shape[0]
    vocab_size = check_vocab_size(vocab_size, vr, tp_group)
    if fused is None and not fused_available(hidden.device):
        fused = False
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    if h.shape[0] == 0:
        empty = hidden.new_zeros(lead, dtype=torch.float32)
        return empty, (empty.clone() if with_entropy else None)
    tile = tile_tokens or default_tile_tokens(vr, hidden.device)
    args = (tp_group, float(temperature), int(tile), with_entropy, entropy_grad, fused, vocab_size,
            not sequence_parallel)
    lp, ent = _LMHeadLogprobEntropy.apply(h, weight, target.reshape(-1).long(), *args)
    return lp.view(lead), (ent.view(lead) if with_entropy else None)
