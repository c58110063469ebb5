"""The recipes' numerics on CPU: bf16 parameters with fp32 main parameters and megatron's
distributed optimizer (what every recipe in examples/configs sets), at TP2 and at DP2.

One 2-rank job: per layout, 4 steps straight vs 2 steps and a new train() that resumes; the two
must agree to the bit (weights, fp32 main parameters, Adam moments, every logged metric). Then a
NaN put into the distributed optimizer's own state (a moment or an fp32 main-parameter shard,
neither of which ``optimizer.state_dict()`` shows) must be refused at save.

Runs on both megatron-core legs of `make test` (0.16.1 and the Dockerfile's 0.19.2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_less.parallel.spawn import run_distributed
from megatron_less.trainer.config import load_config
from tests import train_fixtures

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"
LAYOUTS = {"tp2": ["parallel.tp=2"], "dp2": []}
METRICS = ("reward/mean", "loss/total", "actor/grad_norm", "rollout/entropy", "actor/pg_loss", "optim/lr")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return train_fixtures.run_inputs(tmp_path_factory, "users_stack")


def _args(tiny, out, *extra) -> list[str]:
    return [f"model.hf_dir={tiny['hf']}", f"data.train_file={tiny['data']}", f"output_dir={out}", "train.steps=4",
            "rollout.n=4", "batch.prompts_per_step=4", "batch.mini_batch_prompts=4", "batch.micro_batch_tokens=64",
            "log.tensorboard=false", "optim.lr_schedule=cosine", "optim.warmup_steps=1", "model.dtype=bf16",
            "optim.use_distributed_optimizer=true", *extra]  # fmt: skip


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _job(tiny, root):
    import torch.distributed as dist

    from megatron_less.checkpoints import train_state
    from megatron_less.checkpoints.files import CheckpointError
    from megatron_less.trainer.loop import train

    root = Path(root)
    res = {}

    def state(run):
        """This rank's model weights, and every tensor its inner torch optimizer holds: the fp32
        main-parameter shards it updates and their Adam moments."""
        inner = [o.optimizer for o in getattr(run.policy.optimizer, "chained_optimizers", [run.policy.optimizer])]
        main = [p.detach().clone() for o in inner for g in o.param_groups for p in g["params"]]
        moments = [v.clone() for o in inner for g in o.param_groups for p in g["params"]
                   for _, v in sorted(o.state.get(p, {}).items()) if torch.is_tensor(v)]  # fmt: skip
        weights = [p.detach().clone() for p in run.policy.module.parameters()]
        return weights, main, moments

    for name, extra in LAYOUTS.items():
        def cfg(out, *more):
            return load_config(CONFIG, _args(tiny, root / name / out, *extra, *more))

        full = train(cfg("full"))
        w, main, moments = state(full)
        train(cfg("split", "train.stop_after_steps=2"))
        resumed = train(cfg("split", "checkpoint.resume=auto"))
        w2, main2, moments2 = state(resumed)
        res[name] = {
            "dtypes": sorted({str(t.dtype) for t in w}),
            "main_dtypes": sorted({str(t.dtype) for t in main}),
            "n_moments": len(moments),
            "same_weights": len(w) == len(w2) and all(torch.equal(a, b) for a, b in zip(w, w2)),
            "same_main": len(main) == len(main2) and all(torch.equal(a, b) for a, b in zip(main, main2)),
            "same_moments": len(moments) == len(moments2) and all(torch.equal(a, b) for a, b in zip(moments, moments2)),
            "moved": any(not torch.equal(a, b) for a, b in zip(main, state(train(cfg("one", "train.steps=1")))[1])),
        }
        dist.barrier()

    # a NaN in the distributed optimizer's inner state on rank 1 only: a moment, then a main param
    run = resumed
    run.step = 9
    inner = [o.optimizer for o in getattr(run.policy.optimizer, "chained_optimizers", [run.policy.optimizer])]
    res["nan_errors"] = []
    for where in ("exp_avg_sq", "main"):
        with torch.no_grad():
            p = inner[0].param_groups[0]["params"][0]
            t = p if where == "main" else inner[0].state[p][where]
            keep = t.view(-1)[0].clone()
            if dist.get_rank() == 1:
                t.view(-1)[0] = float("nan")
        try:
            train_state.save(run)
            res["nan_errors"].append("")
        except CheckpointError as e:
            res["nan_errors"].append(str(e))
        with torch.no_grad():
            t.view(-1)[0] = keep
        dist.barrier()
    res["left"] = sorted(p.name for p in (root / "dp2" / "split" / "checkpoints").iterdir())
    return res if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def job(tiny):
    root = tiny["root"] / "job"
    return root, run_distributed(_job, 2, (tiny, str(root)), timeout=900)[0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bf16_distributed_optimizer_resumes_bit_exact(job, layout):
    root, res = job
    r = res[layout]
    assert r["dtypes"] == ["torch.bfloat16"] and r["main_dtypes"] == ["torch.float32"], r
    assert r["n_moments"] > 0 and r["moved"], r  # Adam state exists and a step moves the main params
    full, split = _rows(root / layout / "full"), _rows(root / layout / "split")
    assert [x["step"] for x in split] == [1, 2, 3, 4]
    assert any(isinstance(x["actor/grad_norm"], float) and x["actor/grad_norm"] > 0 for x in full[2:])
    for a, b in zip(full, split):
        for k in METRICS:
            assert a[k] == b[k], f"{layout} step {a['step']} {k}: {a[k]} != {b[k]}"
    assert r["same_weights"] and r["same_main"] and r["same_moments"], r


def test_nan_in_distributed_optimizer_state_is_refused(job):
    _, res = job
    moment, main = res["nan_errors"]
    assert "refusing to save step 9" in moment and "rank 1: optimizer state" in moment, moment
    assert "exp_avg_sq" in moment, moment
    assert "refusing to save step 9" in main and "rank 1: optimizer" in main and "main" in main, main
    assert "step_000009" not in res["left"] and not any(n.endswith(".partial") for n in res["left"])
