"""vocab_parallel_logprob_entropy at TP 1/2/4 against a float64 reference on the gathered logits.

One 4-process gloo job runs every case at every TP size (TP2 = groups {0,1} and {2,3}) and
returns outputs, gradient shards and communication counts; the tests assert on them.

Padded cases: a real vocabulary of 250 padded as Megatron does (a multiple of 128*TP: 256 at
TP1/2, 512 at TP4 - where rank 1 is part padding and ranks 2, 3 all padding), the padding
filled with junk larger than every real logit so that any leak shows; the references see only
the real columns.
"""

import pytest
import torch

from megatron_less.ops import vocab_parallel_logprob_entropy as op
from megatron_less.parallel.spawn import run_distributed
from tests.vocab_reference import reference

V = 1012  # 253 per rank at TP4: odd shard widths
TPS = (1, 2, 4)
CASES = {
    # name: token shape, temperature, chunk size, dtype, extra
    "fp32": ((5, 7), 1.0, None, torch.float32, {}),
    "temperature_odd_chunk": ((37,), 0.6, 5, torch.float32, {}),
    "bf16": ((3, 11), 1.7, 4, torch.bfloat16, {}),
    # confident tokens (p_t up to 1 - 1e-7): where 1 - p_t and low entropies cancel in fp32
    "peaked": ((40,), 0.8, 7, torch.float32, {"peaked": True}),
    "padded": ((8, 5), 0.8, 4, torch.float32, {"peaked": True, "vocab": 250}),
    "padded_bf16": ((9,), 1.3, None, torch.bfloat16, {"vocab": 250}),
    # banned tokens (-inf, and finfo.min as a stand-in); token 0: a whole TP2 (and TP4) shard -inf
    "masked": ((6, 4), 0.7, 5, torch.float32, {"masked": True}),
}
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "send", "recv", "barrier")


def _padded(vocab, tp):
    m = 128 * tp
    return -(-vocab // m) * m


def _case(name, tp=1):
    """Logits of the whole (for padded cases: padded for this TP) vocabulary; the real columns,
    targets and upstream gradients do not depend on tp."""
    shape, temp, chunk, dtype, extra = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    n = int(torch.tensor(shape).prod())
    v = extra.get("vocab", V)
    x = torch.randn(n, v, generator=g) * 3 + 20  # offset: nothing may rely on logits near 0
    t = torch.randint(0, v, (n,), generator=g)
    t[:4] = torch.arange(4) * (v // 4) + 7  # a target on every TP4 shard (real ones if padded)
    if extra.get("peaked"):
        x[torch.arange(n), torch.arange(n)] += torch.linspace(4, 16, n) / temp
        t[4::2] = torch.arange(4, n, 2)  # half the targets are the argmax
    gl, gh = torch.randn(2, n, generator=g).view(2, *shape)
    if extra.get("masked"):
        x[torch.rand(n, v, generator=g) < 0.3] = -torch.inf
        x[0, v // 2 :] = -torch.inf
        x[1, ::3] = torch.finfo(torch.float32).min
        x[torch.arange(n), t] = torch.randn(n, generator=g) * 3 + 20  # targets are real tokens
    if "vocab" in extra:  # junk above every real logit: a leak into max, sums or entropy shows
        junk = torch.randn(n, _padded(v, 4) - v, generator=g) + 30
        x = torch.cat([x, junk[:, : _padded(v, tp) - v]], -1)
    x = x.to(dtype).view(*shape, x.shape[-1])
    return x, t.view(shape), gl, gh, temp, chunk


def _vocab(name):
    """The real vocabulary size of a case: its reference, and the op's vocab_size (None: V)."""
    return CASES[name][4].get("vocab")


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()]).clone()


def _job():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups = {1: None, 2: pairs[rank // 2], 4: dist.group.WORLD}
    calls = {"n": 0}
    for name in COLLECTIVES:
        real = getattr(dist, name)

        def counted(*a, _real=real, **k):
            calls["n"] += 1
            return _real(*a, **k)

        setattr(dist, name, counted)

    out = {}
    for name in CASES:
        for tp in TPS:
            x_full, t, gl, gh, temp, chunk = _case(name, tp)
            x = x_full.chunk(tp, -1)[rank % tp].clone()
            before = _bits(x)
            kw = dict(tp_group=groups[tp], temperature=temp, chunk_size=chunk, vocab_size=_vocab(name))

            def grad_of(loss_fn, x=x, t=t, kw=kw, **extra):
                xx = x.detach().clone().requires_grad_()
                lp, h = op(xx, t, **kw, **extra)
                calls["n"] = 0
                loss_fn(lp, h).backward()
                return xx.grad, lp, h, calls["n"]

            xx = x.requires_grad_()  # the original tensor: must come back bit-identical
            calls["n"] = 0
            lp, h = op(xx, t, **kw)
            fwd_calls = calls["n"]
            calls["n"] = 0
            (lp * gl + h * gh).sum().backward()
            bwd_calls = calls["n"]
            both = lambda lp, h, gl=gl, gh=gh: (lp * gl + h * gh).sum()
            g_noent, _, h_noent, _ = grad_of(both, entropy_grad=False)
            g_lponly, lp_only, h_none, _ = grad_of(lambda lp, h, gl=gl: (lp * gl).sum(), with_entropy=False)
            g_entonly = grad_of(lambda lp, h, gh=gh: (h * gh).sum())[0]
            if name == "masked":
                out[("masked_target", tp)] = _banned_target(x, t, gl, gh, kw)
            out[(name, tp)] = dict(
                lp=lp.detach(), h=h.detach(), grad=xx.grad, grad_noent=g_noent, grad_lponly=g_lponly,
                grad_entonly=g_entonly, noent_detached=not h_noent.requires_grad,
                noent_same_values=torch.equal(h_noent, h.detach()), lp_only_same=torch.equal(lp_only, lp),
                h_none=h_none is None, unchanged=torch.equal(_bits(x.detach()), before),
                fwd_calls=fwd_calls, bwd_calls=bwd_calls,
            )
    dist.destroy_process_group()
    return out


BANNED = 1000  # -inf in token 0 of the masked case (the last TP2 / TP4 shard)


def _banned_target(x, t, gl, gh, kw):
    """The masked case with token 0's target banned: log-prob -inf, everything else finite."""
    t = t.clone()
    t.view(-1)[0] = BANNED
    xx = x.detach().clone().requires_grad_()
    lp, h = op(xx, t, **kw)
    (lp * gl + h * gh).sum().backward()
    return dict(lp=lp.detach(), h=h.detach(), grad=xx.grad, t=t)


def _ref_grad(x, t, temp, loss_fn):
    xx = x.double().requires_grad_()
    loss_fn(*reference(xx, t, temp)).backward()
    return xx.grad


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_job, 4, timeout=300)


@pytest.fixture(scope="module")
def refs():
    out = {}
    for name in CASES:
        x, t, gl, gh, temp, _ = _case(name)
        x = x[..., : _vocab(name) or V]  # the real columns only
        lp, h = reference(x, t, temp)
        out[name] = dict(
            lp=lp, h=h,
            grad=_ref_grad(x, t, temp, lambda lp, h, gl=gl, gh=gh: (lp * gl + h * gh).sum()),
            grad_lponly=_ref_grad(x, t, temp, lambda lp, h, gl=gl: (lp * gl).sum()),
            grad_entonly=_ref_grad(x, t, temp, lambda lp, h, gh=gh: (h * gh).sum()),
        )
    return out


def _gathered(runs, key, tp, what):
    return torch.cat([runs[r][key][what] for r in range(tp)], -1)


def _assert_grad_close(got, ref, dtype):
    if dtype == torch.bfloat16:
        # fp32 math, then one rounding to bf16 (unit roundoff 2^-8): the bf16 nearest to the
        # exact value, but for entries whose fp32 value lies within its error of a tie
        assert got.dtype == torch.bfloat16
        err = (got.double() - ref).abs()
        assert (err <= 2.0**-8 * (1 + 1e-5) * ref.abs()).all(), (err / ref.abs()).max()
        assert (got == ref.to(torch.bfloat16)).double().mean() > 0.999
    else:
        assert got.dtype == torch.float32
        # per token, normwise: every row relative to its own scale, tiny rows included
        rel = (got.double() - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert rel.max() < 1e-6, rel.max()


PARAMS = [(name, tp) for name in CASES for tp in TPS]


@pytest.mark.parametrize("name,tp", PARAMS)
def test_values_match_float64(runs, refs, name, tp):
    got, ref = runs[0][(name, tp)], refs[name]
    for what in ("lp", "h"):
        assert got[what].dtype == torch.float32 and got[what].shape == ref[what].shape
        rel = ((got[what].double() - ref[what]).abs() / ref[what].abs()).max()
        assert rel < 1e-6, (what, rel)


@pytest.mark.parametrize("name,tp", PARAMS)
def test_gradients_match_float64(runs, refs, name, tp):
    dtype = CASES[name][3]
    for what in ("grad", "grad_lponly", "grad_entonly"):
        got = _gathered(runs, (name, tp), tp, what)
        _assert_grad_close(got[..., : _vocab(name) or V], refs[name][what], dtype)


PADDED = [(name, tp) for name, tp in PARAMS if _vocab(name)]


@pytest.mark.parametrize("name,tp", PADDED)
def test_padding_columns_get_exactly_zero_gradient(runs, name, tp):
    vocab = _vocab(name)
    assert _gathered(runs, (name, tp), tp, "grad").shape[-1] == _padded(vocab, tp)
    for what in ("grad", "grad_noent", "grad_lponly", "grad_entonly"):
        pad = _gathered(runs, (name, tp), tp, what)[..., vocab:]
        assert pad.numel() > 0 and not pad.any(), what
    if tp == 4:  # ranks 2 and 3 hold nothing but padding
        assert not runs[2][(name, 4)]["grad"].any() and not runs[3][(name, 4)]["grad"].any()


def _categorical(x, t, temp):
    """torch.distributions' log-prob and entropy, float64 (its entropy's gradient is NaN at -inf
    logits, so gradients are checked against the float64 reference instead)."""
    cat = torch.distributions.Categorical(logits=x.double() / temp)
    return cat.log_prob(t), cat.entropy()


@pytest.mark.parametrize("tp", TPS)
def test_masked_logits_match_categorical(runs, refs, tp):
    """-inf logits are tokens of probability 0: 0 log 0 = 0 in the entropy, not NaN."""
    x, t, _, _, temp, _ = _case("masked")
    assert x.view(-1, V)[0, V // 2 :].isinf().all() and (x == torch.finfo(torch.float32).min).any()
    got = runs[0][("masked", tp)]
    for mine, ref in zip((got["lp"], got["h"]), _categorical(x, t, temp)):
        assert torch.isfinite(mine).all()
        assert ((mine.double() - ref).abs() / ref.abs()).max() < 1e-6
    for what in ("grad", "grad_lponly", "grad_entonly"):
        mine = _gathered(runs, ("masked", tp), tp, what)
        assert torch.isfinite(mine).all() and not mine[x.isinf()].any()
        _assert_grad_close(mine, refs["masked"][what], torch.float32)


@pytest.mark.parametrize("tp", TPS)
def test_banned_target_gets_minus_inf_and_a_finite_gradient(runs, tp):
    x, _, gl, gh, temp, _ = _case("masked")
    got = runs[0][("masked_target", tp)]
    assert x.view(-1, V)[0, BANNED] == -torch.inf
    lp, h = _categorical(x, got["t"], temp)
    assert got["lp"].view(-1)[0] == lp.view(-1)[0] == -torch.inf
    assert torch.allclose(got["lp"].view(-1)[1:].double(), lp.view(-1)[1:], rtol=1e-6, atol=0)
    assert torch.allclose(got["h"].double(), h, rtol=1e-6, atol=0)
    mine = _gathered(runs, ("masked_target", tp), tp, "grad")
    assert torch.isfinite(mine).all()
    ref = _ref_grad(x, got["t"], temp, lambda lp, h: (lp * gl + h * gh).sum())
    _assert_grad_close(mine, ref, torch.float32)


@pytest.mark.parametrize("name,tp", PARAMS)
def test_input_bit_identical_after_forward_and_backward(runs, name, tp):
    assert all(r[(name, tp)]["unchanged"] for r in runs)


@pytest.mark.parametrize("name,tp", PARAMS)
def test_entropy_grad_off_is_logprob_only(runs, name, tp):
    for r in runs:
        got = r[(name, tp)]
        assert torch.equal(got["grad_noent"], got["grad_lponly"])
        assert got["noent_detached"] and got["noent_same_values"]
        assert got["lp_only_same"] and got["h_none"]


@pytest.mark.parametrize("name,tp", PARAMS)
def test_one_collective_forward_none_backward(runs, name, tp):
    for r in runs:
        assert r[(name, tp)]["fwd_calls"] == (1 if tp > 1 else 0)
        assert r[(name, tp)]["bwd_calls"] == 0


@pytest.mark.parametrize("name,tp", PARAMS)
def test_ranks_of_a_group_agree(runs, name, tp):
    for r in runs[1:]:
        for what in ("lp", "h"):
            assert torch.equal(r[(name, tp)][what], runs[0][(name, tp)][what])
    if tp == 2:  # the second pair computed the same shards
        for r in (0, 1):
            assert torch.equal(runs[r][(name, 2)]["grad"], runs[r + 2][(name, 2)]["grad"])


def test_memory_is_one_workspace_not_tokens_by_vocab():
    from megatron_less.ops.memory import peak_tensor_bytes

    n, vr, chunk = 512, 1000, 16
    x = torch.randn(n, vr, requires_grad=True)
    t = torch.randint(0, vr, (n,))
    workspace, small = 2 * chunk * vr * 4, 256 * n  # two fp32 chunk buffers; O(tokens) stats
    fwd, (lp, h) = peak_tensor_bytes(lambda: op(x, t, chunk_size=chunk))
    assert fwd <= workspace + small < n * vr * 4 / 4
    # backward: the gradient itself, plus one fp32 chunk (fp32 input: p lives in the gradient)
    bwd, _ = peak_tensor_bytes(lambda: (lp + h).sum().backward())
    assert bwd <= n * vr * 4 + workspace // 2 + small


def test_default_chunk_bounds_the_workspace():
    from megatron_less.ops import default_chunk_size

    for vr in (1, 16_384, 151_936, 10**8):
        for dev, budget in (("cpu", 1 << 20), ("cuda", 256 << 20)):
            c = default_chunk_size(vr, torch.device(dev))
            assert c >= 1 and (c == 1 or c * vr * 4 <= budget)


def test_shapes_and_arguments():
    x = torch.randn(2, 3, 10)
    t = torch.randint(0, 10, (2, 3))
    lp, h = op(x, t, with_entropy=False)
    assert lp.shape == (2, 3) and h is None
    lp, h = op(x[:, :0], t[:, :0])
    assert lp.shape == h.shape == (2, 0)
    with pytest.raises(ValueError):
        op(x, t, temperature=0.0)
    with pytest.raises(ValueError):
        op(x, t[:, :2])
    with pytest.raises(TypeError):
        op(x.long(), t)
    for bad in (0, 11):  # vocab_size: in [1, V]
        with pytest.raises(ValueError):
            op(x, t, vocab_size=bad)
    xx = x.clone().requires_grad_()
    lp, h = op(xx, t, vocab_size=10)  # the whole vocabulary: the same as None, bit for bit
    (lp + h).sum().backward()
    x2 = x.clone().requires_grad_()
    lp2, h2 = op(x2, t)
    (lp2 + h2).sum().backward()
    assert torch.equal(lp, lp2) and torch.equal(h, h2) and torch.equal(xx.grad, x2.grad)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["temperature_odd_chunk", "bf16", "peaked", "padded", "padded_bf16",
                                  "masked"])
def test_fused_kernels_match_float64(refs, name):
    """The torch.compile path (CUDA's default) through CPU inductor: 40-70 s of compiling on a
    clean cache (2 cores), hence slow: `pytest -m slow tests/test_vocab_parallel.py`."""
    x, t, gl, gh, temp, chunk = _case(name)
    xx = x.clone().requires_grad_()
    lp, h = op(xx, t, temperature=temp, chunk_size=chunk, fused=True, vocab_size=_vocab(name))
    (lp * gl + h * gh).sum().backward()
    for got, ref in ((lp, refs[name]["lp"]), (h, refs[name]["h"])):
        assert ((got.double() - ref).abs() / ref.abs()).max() < 1e-6
    vocab = _vocab(name) or V
    _assert_grad_close(xx.grad[..., :vocab], refs[name]["grad"], CASES[name][3])
    assert not xx.grad[..., vocab:].any()
    assert torch.equal(_bits(xx.detach()), _bits(x))


@pytest.mark.slow
def test_fused_kernels_do_not_recompile_per_vocab_size():
    """The real-column count is a tensor argument: new values (and widths) reuse the kernels."""
    from torch._dynamo.utils import counters

    def call(width, vocab_size, n):
        x = torch.randn(n, width, requires_grad=True)
        lp, h = op(x, torch.randint(0, vocab_size or width, (n,)), fused=True, vocab_size=vocab_size)
        (lp + h).sum().backward()

    call(256, 250, 9)  # compiles (or reuses the kernels of the tests above)
    graphs = counters["stats"]["unique_graphs"]
    for width, vocab_size, n in ((256, 200, 9), (384, 300, 17), (384, None, 5), (256, 129, 9)):
        call(width, vocab_size, n)
    assert counters["stats"]["unique_graphs"] == graphs
