"""Every patch of megatron-core (``parallel/mcore_compat/``) is still needed: removing a CPU
patch breaks a real training step; saving without ``sync_save`` starts a Manager process that
re-imports ``__main__``.

When a megatron-core upgrade fixes one of these spots, its test here fails: delete the patch."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import traceback

import pytest
import torch

from megatron_less.parallel import mcore_compat
from megatron_less.parallel.spawn import run_distributed

cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="CUDA present: the CPU patches are not applied, so there is nothing to remove here; "
    "tests/gpu/megatron_gpu.py checks instead that none is applied and that megatron's own CUDA "
    "path trains (tests/gpu/check.sh)",
)

SINGLE_PROCESS = [
    "rotary_device", "rng_tracker", "schedule_device", "causal_mask", "ddp_buffers",
    "optimizer_device", "clip_grads_device", "clip_grads_type_check", "memory_buffer",
    "dist_ckpt_save",
]
# Order matters: a failed p2p transfer leaves the process group broken, so it goes last.
PIPELINE = ["tied_embedding_sync", None, "p2p_device"]
# TP2 with sequence parallelism: the sequence-split collectives and the linear's backward
SEQUENCE_PARALLEL = [None, "sequence_parallel_mappings", "sequence_parallel_linear"]
# bf16 + the distributed optimizer (the recipes' numerics): a step, a checkpoint of model and
# optimizer, a load into a fresh optimizer (the last two patches apply without apex/TE)
BF16_DISTRIBUTED = ["optimizer_type_names", "distrib_state_dict_fresh", "distrib_load_shared_step"]


def _train_step_without(tp, pp, names, sequence_parallel=False):
    """A full step (build, forward/backward over 2 micro-batches, clipped Adam step, torch_dist
    checkpoint save) with one patch removed at a time; returns the error per patch (None: it
    worked) and, under "where:<patch>", the innermost megatron-core frame ("module:function") of
    the failure, and under PP the tied embedding/output weight this stage holds after the build."""
    import tempfile
    from megatron_less.models import qwen2
    from megatron_less.parallel import runtime
    from megatron_less.models.policy import OptimConfig, build_policy, forward_backward
    from tests import tiny

    # torch's CUDA initialisation fails on this machine; note its caller's stack, as a save
    # reports only the message of the error it caught (the real function still runs and raises)
    failed_inits = []
    lazy_init = torch.cuda._lazy_init

    def noting_lazy_init():
        try:
            return lazy_init()
        except Exception:
            failed_inits.append(traceback.extract_stack()[:-1])
            raise

    torch.cuda._lazy_init = noting_lazy_init
    runtime.initialize(tp, pp)
    arch = qwen2.Qwen2Arch.from_hf(dict(tiny.BASE, num_hidden_layers=2))
    out = {}
    for name in names:
        failed_inits.clear()
        ctx = mcore_compat.without(name) if name else contextlib.nullcontext()
        with ctx:
            try:
                # local attention: the SDPA module builds no causal mask (the causal_mask patch's spot)
                policy = build_policy(arch, tp=tp, pp=pp, optim=OptimConfig(clip_grad=1.0), attention="local",
                                      sequence_parallel=sequence_parallel)
                if name is None and pp > 1:
                    out["tied_weight"] = policy.module.shared_embedding_or_output_weight().detach().clone()
                toks = torch.randint(0, arch.vocab_size, (4, 17), generator=torch.Generator().manual_seed(0))

                def fwd(it, model):
                    t = next(it)
                    pos = torch.arange(16).expand(t.shape[0], 16)
                    return model(t[:, :-1], pos, None, labels=t[:, 1:]), lambda o: (o.float().mean(), {})

                forward_backward(policy, list(toks.chunk(2)), fwd, num_microbatches=2, seq_length=16, micro_batch_size=2)
                policy.optimizer.step()
                if pp == 1 and tp == 1:  # one save proves the writer patch; PP and SP runs test their spots
                    from megatron_less.checkpoints.model import save_checkpoint

                    with tempfile.TemporaryDirectory() as d:
                        save_checkpoint(policy.module, os.path.join(d, "ckpt"), arch, hf_config=dict(tiny.BASE, num_hidden_layers=2))
                out[name] = None
            except Exception as e:  # noqa: BLE001
                out[name] = f"{type(e).__name__}: {e}"
                # a save reports the message only: then the stack of the CUDA call that failed
                frames = _megatron_frames(traceback.extract_tb(e.__traceback__))
                if not frames and failed_inits:
                    frames = _megatron_frames(failed_inits[-1])
                out[f"where:{name}"] = frames[-1] if frames else None
    torch.cuda._lazy_init = lazy_init
    return out


def _bf16_distributed_roundtrip_without(names):
    """Per patch removed: a bf16 model under the distributed optimizer takes a step, is saved
    with its optimizer state (dp_reshardable) and loaded into a fresh one; the loaded state must
    equal the saved one, each parameter with its own Adam step. Returns errors as above."""
    import tempfile

    from megatron_less.checkpoints.model import load_with, save_checkpoint
    from megatron_less.models import qwen2
    from megatron_less.models.policy import OptimConfig, build_policy, forward_backward
    from tests import tiny

    hf = dict(tiny.BASE, num_hidden_layers=2)
    arch = qwen2.Qwen2Arch.from_hf(hf)
    fmt = {"metadata": {"distrib_optim_sharding_type": "dp_reshardable"}}
    weights = tiny.hf_model(0, num_hidden_layers=2).state_dict()

    def build():
        return build_policy(arch, params_dtype=torch.bfloat16, hf_weights=weights,
                            optim=OptimConfig(use_distributed_optimizer=True))

    def inner(policy):
        return [o.optimizer for o in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer])]

    out = {}
    for name in names:
        ctx = mcore_compat.without(name) if name else contextlib.nullcontext()
        with ctx:
            try:
                policy = build()
                toks = torch.randint(0, arch.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))

                def fwd(it, model):
                    t = next(it)
                    return model(t[:, :-1], torch.arange(8).expand(1, 8), None, labels=t[:, 1:]), \
                        lambda o: (o.float().mean(), {})

                forward_backward(policy, list(toks.chunk(2)), fwd, num_microbatches=2, seq_length=8, micro_batch_size=1)
                policy.optimizer.step()
                saved = [t.clone() for o in inner(policy) for g in o.param_groups for p in g["params"]
                         for t in (p.detach(), *(v for _, v in sorted(o.state[p].items())))]  # fmt: skip
                with tempfile.TemporaryDirectory() as d:
                    extra = {"optimizer": policy.optimizer.sharded_state_dict(policy.module.sharded_state_dict(), **fmt)}
                    save_checkpoint(policy.module, os.path.join(d, "ckpt"), arch, hf_config=hf, extra_sharded=extra)
                    fresh = build()
                    extra = {"optimizer": fresh.optimizer.sharded_state_dict(fresh.module.sharded_state_dict(),
                                                                             is_loading=True, **fmt)}
                    _, loaded = load_with(fresh.module, os.path.join(d, "ckpt"), arch, extra)
                    fresh.optimizer.load_state_dict(loaded["optimizer"])
                states = [o.state[p] for o in inner(fresh) for g in o.param_groups for p in g["params"]]
                got = [t for o in inner(fresh) for g in o.param_groups for p in g["params"]
                       for t in (p.detach(), *(v for _, v in sorted(o.state[p].items())))]  # fmt: skip
                steps = [s["step"] for s in states]
                if len({id(t) for t in steps}) != len(steps) or any(float(t) != 1.0 for t in steps):
                    raise AssertionError(f"wrong Adam steps after the load: {sorted({float(t) for t in steps})} in "
                                         f"{len({id(t) for t in steps})} tensors for {len(steps)} parameters")
                if len(got) != len(saved) or not all(torch.equal(a, b) for a, b in zip(saved, got)):
                    raise AssertionError("the loaded optimizer state differs from the saved one")
                out[name] = None
            except Exception as e:  # noqa: BLE001
                out[name] = f"{type(e).__name__}: {e}"
                frames = _megatron_frames(traceback.extract_tb(e.__traceback__))
                out[f"where:{name}"] = frames[-1] if frames else None
    return out


def _single_job(names, bf16_names):
    out = _train_step_without(1, 1, names)
    out["bf16"] = _bf16_distributed_roundtrip_without(bf16_names)
    return out


def _megatron_frames(frames) -> list[str]:
    """'megatron.core.module:function' for each megatron-core frame of a stack, outermost first."""
    spots = []
    for f in frames:
        path = f.filename.replace(os.sep, "/")
        if "/megatron/core/" in path and path.endswith(".py"):
            module = "megatron/core/" + path.split("/megatron/core/", 1)[1][: -len(".py")]
            spots.append(module.replace("/", ".").removesuffix(".__init__") + ":" + f.name)
    return spots


def _at_the_patched_call(name, err, where) -> bool:
    """The step failed where patch ``name`` acts, in megatron-core's innermost frame ``where``:
    a CUDA call in a module whose ``torch`` the patch swaps, or a function it replaces (e.g. the
    'torch.cuda.FloatTensor' assert of grad clipping)."""
    if where is None:
        return False
    targets = {**mcore_compat.PATCHES, **mcore_compat.TORCH_ADAM_PATCHES}[name].targets
    functions = {attr.rsplit(".", 1)[-1] for attrs in targets.values() for attr in attrs if attr != "torch"}
    module, function = where.split(":")
    return (module in targets and "CUDA" in err) or function in functions


@pytest.fixture(scope="module")
def single():
    return run_distributed(_single_job, 1, ([None] + SINGLE_PROCESS, [None] + BF16_DISTRIBUTED), timeout=400)[0]


@pytest.fixture(scope="module")
def pipeline():
    return run_distributed(_train_step_without, 2, (1, 2, PIPELINE), timeout=300)


@pytest.fixture(scope="module")
def sequence_parallel():
    return run_distributed(_train_step_without, 2, (2, 1, SEQUENCE_PARALLEL, True), timeout=300)


@cpu_only
def test_every_patch_is_covered():
    covered = set(SINGLE_PROCESS) | {n for n in PIPELINE + SEQUENCE_PARALLEL if n} | set(BF16_DISTRIBUTED)
    assert covered == set(mcore_compat.PATCHES) | set(mcore_compat.TORCH_ADAM_PATCHES)


@cpu_only
def test_step_works_with_all_patches(single, pipeline):
    assert single[None] is None
    assert single["bf16"][None] is None  # bf16 + distributed optimizer: step, save, exact reload
    assert [r[None] for r in pipeline] == [None, None]


@cpu_only
@pytest.mark.parametrize("name", SINGLE_PROCESS)
def test_patch_still_needed(single, name):
    err = single[name]
    assert err is not None, f"megatron-core no longer needs patch {name!r}: remove it"
    # the failure must be the patched call's, not any error on the way
    assert _at_the_patched_call(name, err, single[f"where:{name}"]), (err, single[f"where:{name}"])


@cpu_only
@pytest.mark.parametrize("name", BF16_DISTRIBUTED)
def test_bf16_distributed_patch_still_needed(single, name):
    if name in mcore_compat.TORCH_ADAM_PATCHES and not mcore_compat.torch_adam_fallback():
        pytest.skip("apex or TE importable: megatron's optimizers do not run on torch's Adam here")
    err, where = single["bf16"][name], single["bf16"][f"where:{name}"]
    assert err is not None, f"megatron-core no longer needs patch {name!r}: remove it"
    if name == "distrib_load_shared_step":  # a silent error: the state it loads is wrong
        assert err.startswith("AssertionError: wrong Adam steps after the load"), err
    elif name == "optimizer_type_names":  # megatron's refusal of the parameters' type names
        assert "Received torch.BFloat16Tensor" in err and where.startswith("megatron.core.optimizer."), (err, where)
    else:
        assert _at_the_patched_call(name, err, where), (err, where)


@cpu_only
@pytest.mark.parametrize("name", [n for n in PIPELINE if n])
def test_pipeline_patch_still_needed(pipeline, name):
    errs = [(r[name], r.get(f"where:{name}")) for r in pipeline]
    assert any(e and _at_the_patched_call(name, e, w) for e, w in errs), f"patch {name!r} no longer needed? {errs}"


@cpu_only
def test_sequence_parallel_step_and_patches(sequence_parallel):
    assert [r[None] for r in sequence_parallel] == [None, None]  # TP2 + SP trains with every patch
    for name in (n for n in SEQUENCE_PARALLEL if n):
        errs = [(r[name], r.get(f"where:{name}")) for r in sequence_parallel]
        assert all(e and _at_the_patched_call(name, e, w) for e, w in errs), f"patch {name!r} no longer needed? {errs}"


@cpu_only
def test_torch_itself_is_untouched():
    import torch as t

    mcore_compat.apply()
    assert t.zeros.__module__ is None or "megatron_less" not in str(t.zeros.__module__)
    assert type(t.zeros).__name__ == "builtin_function_or_method"
    with pytest.raises((AssertionError, RuntimeError)):
        t.cuda.current_device()
    assert t.Tensor.cuda.__qualname__ == "TensorBase.cuda"


@cpu_only
def test_tied_embedding_is_synced_across_stages(pipeline):
    # the last stage's copy is zeroed by megatron and filled by the all-reduce the patch runs
    first, last = (r["tied_weight"] for r in pipeline)
    assert first.abs().sum() > 0 and torch.equal(first, last)


# --- all platforms: sync_save -------------------------------------------------------------------

# Run as a script: a spawned process re-imports it as __mp_main__ and logs that on line 1.
SAVE_SCRIPT = textwrap.dedent('''
    import sys
    with open(sys.argv[1], "a") as log:
        log.write(__name__ + "\\n")

    if __name__ == "__main__":
        import json, multiprocessing, os
        import torch, torch.distributed as dist
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor
        from megatron_less.parallel import mcore_compat

        mcore_compat.apply()  # the CPU patches (a no-op with CUDA)
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[3], rank=0, world_size=1)

        def save(folder):
            sd = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(4.0))}
            os.makedirs(os.path.join(sys.argv[2], folder))
            dist_checkpointing.save(sd, os.path.join(sys.argv[2], folder))
            return [p.name for p in multiprocessing.active_children()]

        with mcore_compat.sync_save():
            children = {"sync_save": save("a")}
        with open(sys.argv[1]) as log:
            children["log_after_sync_save"] = log.read().split()
        children["plain"] = save("b")
        print(json.dumps(children))
        dist.destroy_process_group()
''')


def test_sync_save_avoids_a_manager_process(tmp_path):
    from megatron_less.parallel.spawn import free_port

    script, log = tmp_path / "save.py", tmp_path / "log"
    script.write_text(SAVE_SCRIPT)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, str(script), str(log), str(tmp_path), str(free_port())],
                       capture_output=True, text=True, timeout=240, env=env, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    # with the patch: no process, __main__ imported once
    assert got["sync_save"] == [] and got["log_after_sync_save"] == ["__main__"]
    # without it megatron starts a Manager server process, which re-imports the script: an
    # entry point without a __main__ guard would run its work again in that process.
    assert len(got["plain"]) == 1, got
    assert log.read_text().split() == ["__main__", "__mp_main__"]
    assert (tmp_path / "a" / "metadata.json").exists() and (tmp_path / "b" / "metadata.json").exists()
