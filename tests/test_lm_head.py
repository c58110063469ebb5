"""lm_head_logprob_entropy (LM head fused with log-prob + entropy, logits in tiles) against the
vocab-parallel op on materialised logits and a float64 reference.

TP1 runs in this process (plain, padded vocabulary, tied embedding, temperature != 1, bf16,
the entropy switches); TP2 runs in one 2-rank gloo job that also counts collectives. The
compiled (torch.compile) tile functions against the eager ones: ``-m slow`` (inductor on CPU).
Padded cases: rows 250..255 of the weight are junk that would dominate every logit if it leaked.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_less.ops import lm_head_logprob_entropy as fused_op
from megatron_less.ops import vocab_parallel_logprob_entropy as op
from megatron_less.parallel.spawn import run_distributed
from tests.vocab_reference import reference

V, H, REAL = 256, 24, 250
CASES = {
    # name: tokens, temperature, tile, vocab_size (None: all V rows are tokens)
    "plain": (29, 1.0, None, None),
    "padded_t07": (33, 0.7, 5, REAL),
    "padded_t13_tile1": (9, 1.3, 1, REAL),
}
REL = 1e-5  # the bar: fp32 within 1e-5 relative (normwise per tensor)


def _case(name):
    n, temp, tile, vocab = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    hidden = torch.randn(n, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.6
    if vocab:  # junk rows aligned with every hidden state: huge logits if they leak
        weight[vocab:] = hidden.mean(0) * 5
    target = torch.randint(0, vocab or V, (n,), generator=g)
    gl, gh = torch.randn(2, n, generator=g)
    return hidden, weight, target, gl, gh, temp, tile, vocab


def _grads(fn, hidden, weight, target, gl, gh, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = fn(h, w, target, **kw)
    (lp * gl + ent * gh).sum().backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def _unfused(h, w, target, tile_tokens=None, **kw):
    return op(h @ w.t(), target, **kw)


def _ref(hidden, weight, target, gl, gh, temp, vocab):
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp, ent = reference((h @ w.t())[:, : vocab or V], target, temp)
    (lp * gl + ent * gh).sum().backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def _rel(got, ref):
    return float((got.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("name", CASES)
def test_tp1_matches_unfused_and_float64(name):
    hidden, weight, target, gl, gh, temp, tile, vocab = _case(name)
    kw = dict(temperature=temp, vocab_size=vocab)
    got = _grads(fused_op, hidden, weight, target, gl, gh, tile_tokens=tile, **kw)
    unf = _grads(_unfused, hidden, weight, target, gl, gh, **kw)
    ref = _ref(hidden, weight, target, gl, gh, temp, vocab)
    for what, a, b, r in zip(("logprob", "entropy", "d_hidden", "d_weight"), got, unf, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert _rel(a, b) < REL, (what, _rel(a, b))
        assert _rel(a, r) < REL, (what, _rel(a, r))
    if vocab:  # padding rows: no gradient at all
        assert torch.equal(got[3][vocab:], torch.zeros_like(got[3][vocab:]))


def test_tied_embedding_gradient_accumulates():
    """The weight is also the input embedding (hidden states come from a lookup in it): its
    gradient is the sum of both uses, as with a tied LM head."""
    hidden, weight, target, gl, gh, temp, tile, vocab = _case("padded_t07")
    tokens = torch.randint(0, REAL, (hidden.shape[0],), generator=torch.Generator().manual_seed(3))

    def run(fn, dtype=torch.float32, **kw):
        w = weight.to(dtype).clone().requires_grad_()
        h = torch.tanh(F.embedding(tokens, w) + hidden.to(dtype))  # a stand-in for the decoder
        lp, ent = fn(h, w, target, temperature=temp, vocab_size=vocab, **kw)
        (lp * gl + ent * gh).sum().backward()
        return w.grad

    got, unf = run(fused_op, tile_tokens=4), run(_unfused)
    ref = run(lambda h, w, t, **kw: [v.float() for v in reference((h @ w.t())[:, :REAL], t, temp)], torch.float64)
    assert _rel(got, unf) < REL and _rel(got, ref) < REL
    assert got[tokens].abs().sum() > 0  # the embedding path contributed


def test_entropy_switches_and_input_grads():
    hidden, weight, target, gl, gh, temp, tile, vocab = _case("padded_t07")
    kw = dict(temperature=temp, vocab_size=vocab, tile_tokens=tile)
    full = _grads(fused_op, hidden, weight, target, gl, gh, **kw)
    # entropy_grad=False: entropy detached, the gradient is the log-prob's alone
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = fused_op(h, w, target, entropy_grad=False, **kw)
    assert not ent.requires_grad and torch.equal(ent, full[1])
    (lp * gl).sum().backward()
    ref = _ref(hidden, weight, target, gl, torch.zeros_like(gh), temp, vocab)
    assert _rel(h.grad, ref[2]) < REL and _rel(w.grad, ref[3]) < REL
    lp2, ent2 = fused_op(hidden, weight, target, with_entropy=False, **kw)
    assert ent2 is None and torch.equal(lp2, full[0])
    # a frozen weight (reference model) gets no gradient, the hidden states still do
    h = hidden.clone().requires_grad_()
    fused_op(h, weight, target, **kw)[0].sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_bf16_accumulates_in_fp32():
    hidden, weight, target, gl, gh, temp, tile, vocab = _case("padded_t07")
    kw = dict(temperature=temp, vocab_size=vocab)
    bf = [t.bfloat16() for t in (hidden, weight)]
    lp, ent, dh, dw = _grads(fused_op, *bf, target, gl, gh, tile_tokens=4, **kw)
    assert dh.dtype == dw.dtype == torch.bfloat16 and lp.dtype == torch.float32
    ref = _ref(*[t.float() for t in bf], target, gl, gh, temp, vocab)
    # a few bf16 roundings (logits, gradient tile, result), not one per tile of accumulation
    for what, a, r in zip(("logprob", "entropy", "d_hidden", "d_weight"), (lp, ent, dh, dw), ref):
        assert _rel(a, r) < 2e-2, (what, _rel(a, r))


def test_rejects_bad_input():
    hidden, weight, target = torch.randn(4, H), torch.randn(V, H), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="does not match"):
        fused_op(hidden, weight[:, :5], target)
    with pytest.raises(TypeError, match="share a float dtype"):
        fused_op(hidden, weight.double(), target)
    with pytest.raises(ValueError, match="vocab_size"):
        fused_op(hidden, weight, target, vocab_size=V + 1)


@pytest.mark.slow
def test_compiled_tiles_match_eager():
    hidden, weight, target, gl, gh, temp, tile, vocab = _case("padded_t07")
    kw = dict(temperature=temp, vocab_size=vocab, tile_tokens=tile)
    eager = _grads(fused_op, hidden, weight, target, gl, gh, fused=False, **kw)
    compiled = _grads(fused_op, hidden, weight, target, gl, gh, fused=True, **kw)
    for a, b in zip(compiled, eager):
        assert _rel(a, b) < REL


# --- TP2 ---------------------------------------------------------------------------------------

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter",
               "reduce_scatter_tensor", "send", "recv", "barrier")


def _tp2_job():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    calls = []
    for name in COLLECTIVES:
        def counted(*a, _real=getattr(dist, name), _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)

        setattr(dist, name, counted)
    out = {}
    for name in CASES:
        hidden, weight, target, gl, gh, temp, tile, vocab = _case(name)
        w = weight.chunk(2)[rank].clone()
        kw = dict(temperature=temp, vocab_size=vocab, tp_group=dist.group.WORLD)
        h, ww = hidden.clone().requires_grad_(), w.clone().requires_grad_()
        calls.clear()
        lp, ent = fused_op(h, ww, target, tile_tokens=tile, **kw)
        fwd = list(calls)
        calls.clear()
        (lp * gl + ent * gh).sum().backward()
        bwd = list(calls)
        unf = list(_grads(_unfused, hidden, w, target, gl, gh, **kw))
        dist.all_reduce(unf[2])  # the input gradient megatron's ColumnParallelLinear all-reduces
        out[name] = dict(fused=(lp.detach(), ent.detach(), h.grad, ww.grad), unfused=unf, fwd=fwd, bwd=bwd)
        # sequence_parallel: the caller's all-gather reduce-scatters dL/dh, so the op leaves it unreduced
        h = hidden.clone().requires_grad_()
        lp, ent = fused_op(h, w, target, tile_tokens=tile, sequence_parallel=True, **kw)
        calls.clear()
        (lp * gl + ent * gh).sum().backward()
        out[name]["sp"] = dict(d_hidden=h.grad, bwd=list(calls))
    dist.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(_tp2_job, 2, timeout=300)


@pytest.mark.parametrize("name", CASES)
def test_tp2_matches_unfused_and_float64(tp2, name):
    hidden, weight, target, gl, gh, temp, tile, vocab = _case(name)
    ref = _ref(hidden, weight, target, gl, gh, temp, vocab)
    for r in range(2):
        got, unf = tp2[r][name]["fused"], tp2[r][name]["unfused"]
        for i, what in enumerate(("logprob", "entropy", "d_hidden")):
            assert _rel(got[i], unf[i]) < REL and _rel(got[i], ref[i]) < REL, (what, r)
        assert _rel(got[3], unf[3]) < REL
    d_w = torch.cat([tp2[r][name]["fused"][3] for r in range(2)])
    assert _rel(d_w, ref[3]) < REL


@pytest.mark.parametrize("name", CASES)
def test_tp2_sequence_parallel_leaves_the_hidden_gradient_to_the_caller(tp2, name):
    """Under sequence parallelism: no collective in backward; each rank's d_hidden is its
    vocabulary shard's part, and the parts sum (megatron's reduce-scatter) to the full gradient."""
    hidden, weight, target, gl, gh, temp, tile, vocab = _case(name)
    ref = _ref(hidden, weight, target, gl, gh, temp, vocab)
    parts = [tp2[r][name]["sp"]["d_hidden"] for r in range(2)]
    assert all(tp2[r][name]["sp"]["bwd"] == [] for r in range(2))
    assert _rel(parts[0] + parts[1], ref[2]) < REL and _rel(parts[0], ref[2]) > 0.01


@pytest.mark.parametrize("name", CASES)
def test_tp2_one_collective_each_way(tp2, name):
    """Forward: the vocab-parallel op's one all-gather of per-token stats; backward: one
    all-reduce of d_hidden (what the output layer's input gradient costs unfused)."""
    for r in range(2):
        assert tp2[r][name]["fwd"] == ["all_gather"]
        assert tp2[r][name]["bwd"] == ["all_reduce"]


# --- backward memory ---------------------------------------------------------------------------

MV, MH, MT, MTILE = 4096, 256, 64, 16  # the weight's gradient (4 MiB fp32) dwarfs a tile's buffers


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_accumulates_weight_gradient_in_place(dtype):
    """Peak tensor bytes of the backward (CPU allocator events, ops.memory): the fp32 [V, H]
    accumulator, the gradient returned in the weight's dtype and tile-sized buffers - no
    per-tile [V, H] temporary (the product of a tile is added into the accumulator in place)."""
    from megatron_less.ops.memory import peak_tensor_bytes

    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(MT, MH, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(MV, MH, generator=g) * 0.1).to(dtype).requires_grad_()
    target = torch.randint(0, MV, (MT,), generator=g)
    gl, gh = torch.randn(2, MT, generator=g)
    lp, ent = fused_op(hidden, weight, target, tile_tokens=MTILE)
    loss = (lp * gl + ent * gh).sum()
    peak, (dh, dw) = peak_tensor_bytes(lambda: torch.autograd.grad(loss, (hidden, weight)))
    item = torch.tensor([], dtype=dtype).element_size()
    accumulator = MV * MH * 4
    result = 0 if dtype == torch.float32 else MV * MH * item  # fp32: the accumulator is the result
    tiles = 8 * MTILE * MV * 4 + 8 * MT * MH * 4  # a few [tile, V] and [T, H] float32 buffers
    assert peak <= accumulator + result + tiles, (peak, accumulator + result + tiles)
    assert dw.dtype == dtype and torch.isfinite(dw.float()).all() and dw.abs().sum() > 0


def test_bf16_product_added_in_row_blocks():
    """The fallback where torch has no fp32-accumulating addmm into an fp32 tensor but keeps
    bf16 matmuls: the product is added a block of rows at a time - same sums as the fp32 cast
    path, and only a block's product is ever allocated."""
    from megatron_less.ops.lm_head import _add_in_row_blocks
    from megatron_less.ops.memory import peak_tensor_bytes

    g = torch.Generator().manual_seed(12)
    a, b = (torch.randn(MV, MTILE, generator=g).bfloat16(), torch.randn(MTILE, MH, generator=g).bfloat16())
    start = torch.randn(MV, MH, generator=g)
    dst = start.clone()
    peak, _ = peak_tensor_bytes(lambda: _add_in_row_blocks(dst, a, b, 256))
    prod = a.float() @ b.float()
    # on CPU each product entry is rounded to bf16 once (half an ulp: 2**-8 relative)
    assert ((dst - (start + prod)).abs() <= prod.abs() * 2**-8 + (start + prod).abs() * 1e-6 + 1e-6).all()
    assert peak <= 4 * 256 * MH * 4, peak  # one block's bf16 and fp32 product and its slice, not [V, H]
