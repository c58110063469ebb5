"""What a run survives, end to end on the tiny model (README, Guarantees):

* kill -9 of the whole torchrun job (during a checkpoint save, at a random moment), resumed
  with checkpoint.resume=auto: every checkpoint and every logged metric bit-equal to an
  uninterrupted run (benchmarks/kill_resume.py, its short version);
* a stop and a resume in a new job: bit-equal, and two saves after the resume work;
* a resume at another layout (DP2 -> TP2, DP2 -> PP2): the run continues, within fp32 tolerance;
* a NaN in the loss or in one gradient: that optimizer step is skipped and counted, the next
  ones are normal, no checkpoint holds a NaN (nor can one be written);
* a full disk at save time: a clear error on every rank, nothing published, the previous
  checkpoint intact, and the run resumes from it to the same end.

One 2-rank job (run_distributed) covers all but the kill trials, which need real torchrun jobs."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from megatron_less.parallel.spawn import run_distributed
from megatron_less.trainer.config import load_config
from tests import train_fixtures

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"
PARITY = ("reward/mean", "loss/total", "actor/grad_norm", "rollout/entropy", "actor/pg_loss")


def _kill_resume():
    spec = importlib.util.spec_from_file_location("kill_resume", REPO / "benchmarks" / "kill_resume.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return train_fixtures.run_inputs(tmp_path_factory, "reliability")


def _args(tiny, out, *extra) -> list[str]:
    return [f"model.hf_dir={tiny['hf']}", f"data.train_file={tiny['data']}", f"output_dir={out}", "train.steps=4",
            "rollout.n=4", "batch.prompts_per_step=4", "batch.mini_batch_prompts=4", "batch.micro_batch_tokens=64",
            "log.tensorboard=false", "optim.lr_schedule=cosine", "optim.warmup_steps=1", *extra]  # fmt: skip


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _ckpts(out) -> list[str]:
    return sorted(p.name for p in (Path(out) / "checkpoints").iterdir())


# --- the 2-rank job ----------------------------------------------------------------------------


def _job(tiny, root):
    import torch.distributed as dist

    from megatron_less.checkpoints.files import CheckpointError
    from megatron_less.parallel.gather import iter_all_hf_tensors
    from megatron_less.trainer.loop import train

    root = Path(root)
    res = {}

    def weights(run):
        return {n: t.clone() for n, t in iter_all_hf_tensors(run.policy.module, run.arch)}

    def opt_tensors(run):
        state = run.policy.optimizer.state_dict()["state"]
        return [v.clone() for s in state.values() for k, v in sorted(s.items()) if isinstance(v, torch.Tensor)]

    def cfg(out, *extra):
        return load_config(CONFIG, _args(tiny, root / out, *extra))

    full = train(cfg("full"))
    w_full, opt_full = weights(full), opt_tensors(full)

    # stop after 2 steps (one save), a new train() resumes and saves at steps 3 and 4
    train(cfg("split", "train.stop_after_steps=2"))
    step2 = root / "split" / "checkpoints" / "step_000002"
    if dist.get_rank() == 0:  # kept from the resumed run's pruning (keep: 2) for the layout resumes
        import shutil

        shutil.copytree(step2, root / "step2_copy")
    dist.barrier()
    resumed = train(cfg("split", "checkpoint.every=1"))
    res["same_weights"] = all(torch.equal(w_full[n], t) for n, t in weights(resumed).items())
    res["same_optimizer"] = all(torch.equal(a, b) for a, b in zip(opt_full, opt_tensors(resumed)))
    res["dp"] = resumed.dp

    # the same step-2 checkpoint resumed at other layouts (DP2 -> TP2 and DP2 -> PP2, both DP1)
    res["layout_weights"] = {}
    for name, extra in (("tp2", "parallel.tp=2"), ("pp2", "parallel.pp=2")):
        run = train(cfg(name, extra, f"checkpoint.resume={root / 'step2_copy'}"))
        res["layout_weights"][name] = max(float((w_full[n] - t).abs().max()) for n, t in weights(run).items())

    # a NaN in the loss (rank 0, step 2) and in one gradient (rank 1, step 3)
    os.environ["MLESS_FAULT"] = "nan_loss:2:0,nan_grad:3:1"
    try:
        train(cfg("nan", "checkpoint.every=1", "checkpoint.keep=4"))
    finally:
        os.environ.pop("MLESS_FAULT")

    # saves that fail as on a full disk, on rank 0 at step 2 (in megatron's shard writer), then,
    # resumed, on rank 1 at step 3 (its RNG file): every rank raises, nothing is published
    res["disk_error"], res["disk_after_error"] = [], []
    for fault in ("disk_full:2:0", "disk_full:3:1"):
        os.environ["MLESS_FAULT"] = fault
        try:
            train(cfg("disk", "checkpoint.every=1", "checkpoint.keep=4"))
            res["disk_error"].append(None)
        except CheckpointError as e:
            res["disk_error"].append(str(e))
        finally:
            os.environ.pop("MLESS_FAULT")
        dist.barrier()
        res["disk_after_error"].append(_ckpts(root / "disk"))
        dist.barrier()
    run = train(cfg("disk", "checkpoint.every=1", "checkpoint.keep=4"))  # resume: auto, from step 2

    # a NaN weight on rank 1: the save is refused on both ranks, before anything is written
    from megatron_less.checkpoints import train_state

    run.step = 7
    if dist.get_rank() == 1:
        with torch.no_grad():
            next(run.policy.module.parameters()).view(-1)[3] = float("nan")
    try:
        train_state.save(run)
        res["nan_save_error"] = ""
    except CheckpointError as e:
        res["nan_save_error"] = str(e)
    res["nan_save_left"] = _ckpts(root / "disk")
    return res if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def job(tiny):
    root = tiny["root"] / "job"
    return root, run_distributed(_job, 2, (tiny, str(root)), timeout=900)[0]


def test_resume_continues_exactly_and_saves_twice(job):
    """DP2: 4 steps straight vs 2 steps, then a new train() that resumes: identical to the bit;
    the resumed run saves twice (steps 3 and 4) and prunes step 2 (keep 2)."""
    root, res = job
    assert res["dp"] == 2
    full, split = _rows(root / "full"), _rows(root / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    assert any(r["actor/grad_norm"] > 0 for r in full[2:]), "no learning signal after the resume point"
    for a, b in zip(full, split):
        for k in (*PARITY, "optim/lr", "reward/accuracy", "response/length_mean"):
            assert a[k] == b[k], f"step {a['step']} {k}: {a[k]} != {b[k]}"
    assert res["same_weights"] and res["same_optimizer"]
    assert _ckpts(root / "split") == ["step_000003", "step_000004"]


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_resume_at_another_layout_continues(job, layout):
    """Steps 3-4 resumed at TP2 (or PP2) from the DP2 run's step-2 checkpoint: per-step metrics
    and final weights within fp32 tolerance of the uninterrupted DP2 run; the data position
    carried over (same rewards means same prompts and responses)."""
    root, res = job
    full = {r["step"]: r for r in _rows(root / "full")}
    rows = _rows(root / layout)
    assert [r["step"] for r in rows] == [3, 4]
    for r in rows:
        for k in (*PARITY, "optim/lr", "reward/accuracy"):
            assert r[k] == pytest.approx(full[r["step"]][k], rel=1e-5, abs=1e-6), f"{layout} step {r['step']} {k}"
    assert res["layout_weights"][layout] < 1e-5


def test_nan_loss_and_nan_grad_skip_their_step(job):
    """The NaN steps are skipped and counted; every other step updates; each checkpoint is
    finite, and a skipped step's checkpoint equals the step before it, weights and optimizer."""
    root, _ = job
    kr = _kill_resume()
    rows = {r["step"]: r for r in _rows(root / "nan")}
    assert [rows[s]["train/skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 2, 2]
    assert [rows[s]["train/step_skipped_updates"] for s in (1, 2, 3, 4)] == [0, 1, 1, 0]
    assert rows[2]["actor/grad_norm"] == rows[3]["actor/grad_norm"] == "nan"  # non-finite: logged as text
    assert all(isinstance(rows[s]["loss/total"], float) for s in (1, 3, 4))
    assert rows[2]["loss/total"] == "nan"
    assert isinstance(rows[4]["actor/grad_norm"], float)
    ckpts = {s: kr.load_checkpoint_files(root / "nan" / "checkpoints" / f"step_{s:06d}") for s in (1, 2, 3, 4)}
    for s, c in ckpts.items():
        bad = [k for k, t in c["tensors"].items() if torch.is_tensor(t) and not torch.isfinite(t).all()]
        assert not bad, f"step {s}: {bad[:3]}"
    for s in (2, 3):  # nothing moved: weights and optimizer as after step 1
        assert kr.differences(ckpts[1]["tensors"], ckpts[s]["tensors"]) == [], s
    assert kr.differences(ckpts[3]["tensors"], ckpts[4]["tensors"]) != []


def test_full_disk_at_save_loses_nothing(job):
    root, res = job
    first, second = res["disk_error"]
    assert first is not None and "step_000002 was not saved (rank 0: CheckpointException" in first
    assert "No space left on device" in first and "rank 1: CheckpointException" in first  # raised on both
    assert second is not None and "step_000003 was not saved (rank 1: OSError" in second
    assert "No space left on device" in second and "rank 0" not in second
    # no step_2 / step_3, no .partial, the earlier ones intact
    assert res["disk_after_error"] == [["step_000001"], ["step_000001", "step_000002"]]
    assert _ckpts(root / "disk") == ["step_000001", "step_000002", "step_000003", "step_000004"]
    full = _rows(root / "full")
    for a, b in zip(full, _rows(root / "disk")):
        for k in (*PARITY, "optim/lr"):
            assert a[k] == b[k], f"step {a['step']} {k}"


def test_save_refuses_non_finite_state(job):
    """The last line of defence: a checkpoint of a NaN weight (on rank 1 only) is refused on
    every rank before anything is written, naming the rank and the tensor."""
    _, res = job
    assert "refusing to save step 7" in res["nan_save_error"] and "rank 1: weight" in res["nan_save_error"]
    assert res["nan_save_left"] == [f"step_{s:06d}" for s in (1, 2, 3, 4)]  # no step_7, no .partial


# --- kill -9 of the whole job: the short version of benchmarks/kill_resume.py ------------------


def test_kill_trials_short(tiny, tmp_path):
    """Two trials of a 3-step run (2 ranks, a checkpoint every step): a kill during the save of
    a checkpoint (its .partial folder is left, the previous checkpoint is the one resumed) and a
    kill at a random moment; the finished run equals the uninterrupted one bit for bit."""
    kr = _kill_resume()
    res = kr.trials(2, steps=3, every=1, nproc=2, work=tmp_path, hf=tiny["hf"], data=tiny["data"])
    print(kr.table(res))
    assert res["ok"], (res["mismatches"], res["metric_diff"])
    first = res["rows"][0]
    assert first["kill"].startswith("save of step")
    at = int(first["kill"].split()[-1])
    assert first["partial_left"] == [f"step_{at:06d}.partial"] and first["newest_complete"] == at - 1
    assert res["checkpoints"] == [1, 2, 3] and res["final_equal"]


def test_kill_in_an_oversampling_round_resumes_exactly(tiny, tmp_path):
    """Dynamic sampling (DAPO) draws extra prompt batches inside a step: a kill -9 in the middle
    of such a round (at a step where the uninterrupted run drew one) resumes from the previous
    checkpoint, draws the same extra batches again and ends bit-equal."""
    kr = _kill_resume()
    res = kr.trials(1, steps=3, every=1, nproc=1, work=tmp_path, hf=tiny["hf"], data=tiny["data"],
                    extra=kr.DYNAMIC, phases=("oversample",))  # fmt: skip
    print(kr.table(res))
    assert res["rows"][0]["kill"].startswith("oversample of step"), res["rows"]
    assert res["ok"], (res["mismatches"], res["metric_diff"])
    assert res["checkpoints"] == [1, 2, 3] and res["final_equal"]
