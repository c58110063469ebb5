"""One tiny Qwen2 trains identically at TP1, TP2, PP2 and TP2xPP2 (DP fills the 4 ranks), and at
TP2 and TP2xPP2 with sequence parallelism (megatron's output layer and loss on split sequences)."""

import pytest
import torch

from megatron_less.parallel.spawn import run_distributed
from tests import tiny

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
SP_LAYOUTS = [(2, 1, "sp"), (2, 2, "sp")]  # the same, sequence-parallel
GLOBAL_BATCH, SEQ, MICROBATCHES = 8, 32, 2
LR = 1e-2
# Where |grad| ~ eps, Adam's first step g / (|g| + eps) turns fp32 rounding of a tiny gradient
# into an lr-sized difference; eps well above rounding keeps the comparison meaningful.
ADAM_EPS = 1e-4


def _layouts_job(layouts):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_less.models import qwen2
    from megatron_less.parallel import gather, runtime
    from megatron_less.models.policy import OptimConfig, build_policy, forward_backward

    hf = tiny.hf_model(seed=0).state_dict()
    arch = qwen2.Qwen2Arch.from_hf(tiny.BASE)
    tokens = torch.randint(0, arch.vocab_size, (2, GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    out = {}
    for tp, pp, *sp in layouts:
        runtime.initialize(tp, pp, seed=7)
        policy = build_policy(arch, tp=tp, pp=pp, hf_weights=hf, optim=OptimConfig(lr=LR, clip_grad=1.0, adam_eps=ADAM_EPS),
                              sequence_parallel=bool(sp))  # fmt: skip
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

        def step(batch, forward_only):
            mine = batch.chunk(dp)[dp_rank]
            mbs = list(mine.chunk(MICROBATCHES))

            def fwd(data_iter, model):
                t = next(data_iter)
                inp, lab = t[:, :-1], t[:, 1:]
                pos = torch.arange(SEQ).expand_as(inp)
                out_t = model(inp, pos, None, labels=lab)

                def loss_fn(o):
                    loss = o.float().mean()
                    return loss, {"loss": loss.detach().clone()}  # the schedule divides loss in place

                return out_t, loss_fn

            res = forward_backward(policy, mbs, fwd, num_microbatches=MICROBATCHES, seq_length=SEQ,
                                   micro_batch_size=mbs[0].shape[0], forward_only=forward_only)
            loss = torch.zeros(())
            if ps.is_pipeline_last_stage():
                loss = torch.stack([r["loss"] for r in res]).mean() / dp
            local = loss.item()  # this rank's share, before any communication
            # every rank learns the global loss: sum over DP and over stages (0 off the last stage)
            dist.all_reduce(loss)
            return (loss / tp).item(), local

        loss0, local0 = step(tokens[0], forward_only=False)
        ok, grad_norm, _ = policy.optimizer.step()
        loss0_after, _ = step(tokens[0], forward_only=True)  # the same batch, after the step
        loss1, _ = step(tokens[1], forward_only=True)
        weights = {n: t.clone() for n, t in gather.iter_hf_tensors(policy.module, arch)}
        keep = ps.get_tensor_model_parallel_rank() == 0 and dp_rank == 0
        rank = dict(local0=local0, dp_rank=dp_rank, tp_rank=ps.get_tensor_model_parallel_rank(),
                    last_stage=ps.is_pipeline_last_stage())
        out[(tp, pp, *sp)] = dict(loss0=loss0, loss0_after=loss0_after, loss1=loss1, grad_norm=grad_norm, ok=ok,
                             dp=dp, rank=rank, weights=weights if keep else {})
    runtime.destroy()
    return out


@pytest.fixture(scope="module")
def results():
    per_rank = run_distributed(_layouts_job, 4, (LAYOUTS + SP_LAYOUTS,), timeout=600)
    merged = {}
    for lay in LAYOUTS + SP_LAYOUTS:
        w = {}
        for r in per_rank:
            w.update(r[lay]["weights"])
        merged[lay] = dict(per_rank[0][lay], weights=w)
        merged[lay]["ranks"] = [r[lay]["rank"] for r in per_rank]
    return merged


@pytest.mark.parametrize("layout", LAYOUTS[1:] + SP_LAYOUTS)
def test_same_loss_and_grad_norm(results, layout):
    ref, got = results[(1, 1)], results[layout]
    assert got["loss0"] == pytest.approx(ref["loss0"], rel=1e-6, abs=1e-6)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6)


def test_every_rank_computes_its_share_of_the_loss(results):
    """Before any communication: the TP ranks of a replica's last stage hold the same loss, other
    stages none, and each DP replica's loss is that of its own data shard - the sum of the
    TP1/PP1 (DP4) replicas' losses over the same samples."""
    dp4 = {r["dp_rank"]: r["local0"] for r in results[(1, 1)]["ranks"]}
    assert len(dp4) == 4 and len(set(dp4.values())) == 4, dp4  # 4 shards, 4 different losses
    for lay in LAYOUTS + SP_LAYOUTS:
        dp, by_replica = results[lay]["dp"], {}
        for r in results[lay]["ranks"]:
            if r["last_stage"]:
                by_replica.setdefault(r["dp_rank"], []).append(r["local0"])
            else:
                assert r["local0"] == 0.0, (lay, r)
        assert sorted(by_replica) == list(range(dp)), lay
        for replica, losses in by_replica.items():
            assert len(losses) == lay[0] and all(x == pytest.approx(losses[0], rel=1e-6) for x in losses), lay
            span = range(replica * 4 // dp, (replica + 1) * 4 // dp)  # its DP4 shards
            assert losses[0] == pytest.approx(sum(dp4[i] for i in span), rel=1e-6), (lay, replica)


def test_loss_is_real(results):
    # random init over 250 tokens: loss near ln(250); one Adam step must lower it on its batch
    ref = results[(1, 1)]
    assert 5.0 < ref["loss0"] < 6.0
    assert ref["ok"] and ref["grad_norm"] > 0
    assert ref["loss0_after"] < ref["loss0"] - 0.05, (ref["loss0"], ref["loss0_after"])
    for lay in LAYOUTS[1:] + SP_LAYOUTS:
        assert results[lay]["loss0_after"] == pytest.approx(ref["loss0_after"], rel=1e-6), lay


@pytest.mark.parametrize("layout", LAYOUTS[1:] + SP_LAYOUTS)
def test_optimizer_step_moves_parameters_identically(results, layout):
    ref, got = results[(1, 1)]["weights"], results[layout]["weights"]
    initial = tiny.hf_model(seed=0).state_dict()
    assert set(ref) == set(got) and len(ref) == 2 + 12 * 4  # embed, norm, 12 per layer; lm_head tied
    for name in ref:
        assert not torch.equal(ref[name], initial[name]), f"{name} did not change"
        # Adam moves each element by ~lr whatever its gradient's size, so fp32 rounding in a
        # near-zero gradient shows up at lr scale: updates must agree to 0.1% of a step.
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-3 * LR, msg=lambda m: f"{name}: {m}")
    assert got and results[layout]["loss1"] == pytest.approx(results[(1, 1)]["loss1"], rel=1e-6)
