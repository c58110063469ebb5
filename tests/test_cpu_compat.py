"""Every CPU patch of megatron-core is still needed: removing it breaks a real training step.

When a megatron-core upgrade fixes one of these spots, its test here fails: delete the patch."""

import contextlib
import os

import pytest
import torch

from megatron_less.parallel import cpu_compat
from megatron_less.parallel.spawn import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="patches apply only without CUDA")

SINGLE_PROCESS = [
    "rotary_device", "rng_tracker", "schedule_device", "causal_mask", "ddp_buffers",
    "optimizer_device", "clip_grads_device", "clip_grads_type_check", "memory_buffer",
    "dist_ckpt_save",
]
# Order matters: a failed p2p transfer leaves the process group broken, so it goes last.
PIPELINE = ["tied_embedding_sync", None, "p2p_device"]


def _train_step_without(tp, pp, names):
    """A full step (build, forward/backward over 2 micro-batches, clipped Adam step, torch_dist
    checkpoint save) with one patch removed at a time; returns the error per patch (None: it
    worked)."""
    import tempfile
    from megatron_less.models import qwen2
    from megatron_less.parallel import runtime
    from megatron_less.models.policy import OptimConfig, build_policy, forward_backward
    from tests import tiny

    runtime.initialize(tp, pp)
    arch = qwen2.Qwen2Arch.from_hf(dict(tiny.BASE, num_hidden_layers=2))
    out = {}
    for name in names:
        ctx = cpu_compat.without(name) if name else contextlib.nullcontext()
        with ctx:
            try:
                policy = build_policy(arch, tp=tp, pp=pp, optim=OptimConfig(clip_grad=1.0))
                toks = torch.randint(0, arch.vocab_size, (4, 17), generator=torch.Generator().manual_seed(0))

                def fwd(it, model):
                    t = next(it)
                    pos = torch.arange(16).expand(t.shape[0], 16)
                    return model(t[:, :-1], pos, None, labels=t[:, 1:]), lambda o: (o.float().mean(), {})

                forward_backward(policy, list(toks.chunk(2)), fwd, num_microbatches=2, seq_length=16, micro_batch_size=2)
                policy.optimizer.step()
                if pp == 1:  # one save proves the writer patch; PP runs test the schedule
                    from megatron_less.checkpoints.model import save_checkpoint

                    with tempfile.TemporaryDirectory() as d:
                        save_checkpoint(policy.module, os.path.join(d, "ckpt"), arch, hf_config=dict(tiny.BASE, num_hidden_layers=2))
                out[name] = None
            except Exception as e:  # noqa: BLE001
                out[name] = f"{type(e).__name__}: {e}"
    return out


@pytest.fixture(scope="module")
def single():
    return run_distributed(_train_step_without, 1, (1, 1, [None] + SINGLE_PROCESS), timeout=300)[0]


@pytest.fixture(scope="module")
def pipeline():
    return run_distributed(_train_step_without, 2, (1, 2, PIPELINE), timeout=300)


def test_every_patch_is_covered():
    assert set(SINGLE_PROCESS) | {n for n in PIPELINE if n} == set(cpu_compat.PATCHES)


def test_step_works_with_all_patches(single, pipeline):
    assert single[None] is None
    assert [r[None] for r in pipeline] == [None, None]


@pytest.mark.parametrize("name", SINGLE_PROCESS)
def test_patch_still_needed(single, name):
    err = single[name]
    assert err is not None, f"megatron-core no longer needs patch {name!r}: remove it"
    assert "CUDA" in err or "AssertionError" in err, err


@pytest.mark.parametrize("name", [n for n in PIPELINE if n])
def test_pipeline_patch_still_needed(pipeline, name):
    errs = [r[name] for r in pipeline]
    assert any(e and "CUDA" in e for e in errs), f"patch {name!r} no longer needed? {errs}"


def test_torch_itself_is_untouched():
    import torch as t

    cpu_compat.apply()
    assert t.zeros.__module__ is None or "megatron_less" not in str(t.zeros.__module__)
    assert type(t.zeros).__name__ == "builtin_function_or_method"
    with pytest.raises((AssertionError, RuntimeError)):
        t.cuda.current_device()
    assert t.Tensor.cuda.__qualname__ == "TensorBase.cuda"
