"""`megatron-less train`: config validation, the loop at every layout (parity between layouts),
loss and gradients against a single-process computation, checkpoints written.

Multi-process jobs are few and shared (each costs ~10-25 s to start on 2 cores): one 4-rank job
runs TP1 (DP4), TP2 (DP2), PP2 (DP2) and TP2xPP2 one after another plus the loss-parity check;
the resume checks are in tests/test_reliability.py. TP2 runs with sequence parallelism (the
default at TP > 1) and TP2xPP2 also with packed sequences, so both meet TP1's numbers on each
megatron-core version (every switch on and off, one at a time: tests/test_sp_packing.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_less.parallel.spawn import run_distributed
from megatron_less.trainer.config import ConfigError, check_layout, load_config
from tests import train_fixtures

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"
STEPS = 3
# what every step must log (TensorBoard and metrics.jsonl)
REQUIRED = ("reward/mean", "reward/accuracy", "response/length_mean", "response/length_max", "response/clip_frac",
            "rollout/entropy", "less/frac_tokens_correct_only", "less/frac_tokens_incorrect_only",
            "less/frac_tokens_shared", "less/mean_weight", "actor/clipfrac", "actor/approx_kl", "actor/grad_norm",
            "optim/lr", "mismatch/abs_log_ratio_mean", "mismatch/abs_log_ratio_max", "mismatch/token_frac_past",
            "mismatch/kl_k3", "mismatch/seq_log_ratio_p99", "loss/excluded_token_frac",
            "batch/padding_frac", "time/rollout_s", "time/update_s", "perf/tokens_per_s", "train/skipped_steps",
            "loss/total")  # fmt: skip
PARITY = ("reward/mean", "loss/total", "actor/grad_norm", "rollout/entropy", "actor/pg_loss")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return train_fixtures.run_inputs(tmp_path_factory, "train")


def _overrides(tiny, out, *extra) -> list[str]:
    return [f"model.hf_dir={tiny['hf']}", f"data.train_file={tiny['data']}", f"output_dir={out}",
            f"train.steps={STEPS}", "rollout.n=4", "batch.prompts_per_step=4", "batch.mini_batch_prompts=4",
            "batch.micro_batch_tokens=64", "log.tensorboard=true", *extra]  # fmt: skip


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# --- config: validated before any process group ------------------------------------------------


def _error(tiny, *extra) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, _overrides(tiny, "/tmp/x", *extra))
    return str(e.value)


def test_config_errors_name_the_key(tiny):
    assert "rollout.nn: unknown key (did you mean 'n'?)" in _error(tiny, "rollout.nn=3")
    assert "optimm: unknown key (did you mean 'optim'?)" in _error(tiny, "optimm.lr=1")
    assert "rollout.top_p" in _error(tiny, "rollout.top_p=1.5")
    assert "optim.lr" in _error(tiny, "optim.lr=-1")
    assert "did you mean 'less'" in _error(tiny, "algo.shaper=lesss")
    assert "algo.policy_loss" in _error(tiny, "algo.policy_loss=nope")
    assert "multiple of batch.mini_batch_prompts" in _error(tiny, "batch.prompts_per_step=6")
    assert "data.train_file: /nope.jsonl does not exist" in _error(tiny, "data.train_file=/nope.jsonl")
    assert "model.dtype" in _error(tiny, "model.dtype=fp8")
    assert "exactly one of model.hf_dir and model.checkpoint" in _error(tiny, "model.checkpoint=/tmp")


def test_layout_checks_need_no_process_group(tiny):
    from megatron_less.trainer.setup import model_arch

    cfg = load_config(CONFIG, _overrides(tiny, "/tmp/x", "parallel.tp=3"))
    with pytest.raises(ConfigError, match="parallel:.*3"):
        check_layout(cfg, model_arch(cfg), 3)
    cfg = load_config(CONFIG, _overrides(tiny, "/tmp/x", "batch.mini_batch_prompts=2", "batch.prompts_per_step=4"))
    with pytest.raises(ConfigError, match="mini_batch_prompts .2. must be a multiple of the data-parallel size 4"):
        check_layout(cfg, model_arch(cfg), 4)
    # bf16 and the distributed optimizer train on CPU too (tests/test_users_stack.py)
    cfg = load_config(CONFIG, _overrides(tiny, "/tmp/x", "model.dtype=bf16", "optim.use_distributed_optimizer=true"))
    assert check_layout(cfg, model_arch(cfg), 2) == 2
    cfg = load_config(CONFIG, _overrides(tiny, "/tmp/x", "rollout.max_tokens=200"))
    with pytest.raises(ConfigError, match="max_position_embeddings 128"):
        check_layout(cfg, model_arch(cfg), 1)


def test_cli_bad_config_fails_fast_and_print_config(tiny):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "megatron_less.cli", "train", str(CONFIG), *_overrides(tiny, "/tmp/x")]
    t0 = time.monotonic()
    bad = subprocess.run([*cmd, "rollout.temprature=1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert bad.returncode == 2 and "rollout.temprature: unknown key (did you mean 'temperature'?)" in bad.stderr
    assert took < 10, f"a bad config took {took:.1f} s to fail"
    ok = subprocess.run([*cmd, "--print-config", "rollout.n=6"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=60)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    import yaml

    printed = yaml.safe_load(ok.stdout)
    assert printed["rollout"]["n"] == 6 and printed["model"]["hf_dir"] == tiny["hf"]


# --- the loop at every layout ------------------------------------------------------------------


def _layouts_job(tiny, root):
    """Rank function: train at each layout in turn; rank 0 returns what the test checks."""
    import torch.distributed as dist

    from megatron_less.parallel.gather import iter_all_hf_tensors
    from megatron_less.checkpoints.hf import HFCheckpoint
    from megatron_less.trainer.loop import train

    out = {}
    for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2)):
        run_dir = Path(root) / f"tp{tp}pp{pp}"
        packed = ["batch.packing=true"] if (tp, pp) == (2, 2) else []
        cfg = load_config(CONFIG, _overrides(tiny, run_dir, f"parallel.tp={tp}", f"parallel.pp={pp}", *packed))
        run = train(cfg)
        start = HFCheckpoint(tiny["hf"])
        moved = max(float((t - start[name]).abs().max()) for name, t in iter_all_hf_tensors(run.policy.module, run.arch))
        if dist.get_rank() == 0:
            out[(tp, pp)] = {"dp": run.dp, "moved": moved, "dir": str(run_dir), "sp": run.policy.config.sequence_parallel,
                             "packed": cfg.batch.packing}
    out["parity"] = _loss_parity(tiny, root)
    return out if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def layouts(tiny):
    return run_distributed(_layouts_job, 4, (tiny, str(tiny["root"] / "layouts")), timeout=900)[0]


def test_every_layout_trains_and_logs(layouts):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert {k: v["dp"] for k, v in layouts.items() if k != "parity"} == {(1, 1): 4, (2, 1): 2, (1, 2): 2, (2, 2): 1}
    assert {k: (v["sp"], v["packed"]) for k, v in layouts.items() if k != "parity"} == {
        (1, 1): (False, False), (2, 1): (True, False), (1, 2): (False, False), (2, 2): (True, True)}
    for (tp, pp), res in ((k, v) for k, v in layouts.items() if k != "parity"):
        rows = _rows(res["dir"])
        assert [r["step"] for r in rows] == [1, 2, 3]
        for r in rows:
            missing = [k for k in REQUIRED if k not in r]
            assert not missing, f"tp{tp}pp{pp}: missing {missing}"
            assert all(isinstance(r[k], float) for k in PARITY), r
        assert res["moved"] > 0, f"tp{tp}pp{pp}: weights did not change"
        acc = EventAccumulator(str(Path(res["dir"]) / "tensorboard"))
        acc.Reload()
        assert set(REQUIRED) <= set(acc.Tags()["scalars"])
        ckpt = Path(res["dir"]) / "checkpoints" / f"step_{STEPS:06d}"
        assert (ckpt / "trainer_state.json").is_file() and (ckpt / "megatron_less.json").is_file()
        assert len((Path(res["dir"]) / "rollouts.jsonl").read_text().splitlines()) == 2 * STEPS


def test_layouts_agree_step_by_step(layouts):
    """Same seed and data: the same per-step reward, loss, grad norm and entropy at every layout."""
    base = _rows(layouts[(1, 1)]["dir"])
    assert any(r["actor/grad_norm"] > 0 for r in base), "no step had a learning signal"
    for key in ((2, 1), (1, 2), (2, 2)):
        for a, b in zip(base, _rows(layouts[key]["dir"])):
            for k in PARITY:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), f"{key} step {a['step']} {k}"


# --- loss and gradients against one process ----------------------------------------------------


def _loss_parity(tiny, root):
    """Every rank: TP2 x DP2, one mini-batch of responses of different lengths split into
    micro-batches of different shapes across two DP ranks; rank 0 recomputes the same loss with
    transformers + megatron_less.algos in one process and compares the gradients."""
    import torch.distributed as dist

    from megatron_less.algos import apply_correction
    from megatron_less.parallel.gather import iter_all_hf_tensors
    from megatron_less.trainer import batch as B
    from megatron_less.trainer import phases
    from megatron_less.trainer.batch import Sequence
    from megatron_less.trainer.passes import LossSpec, train_minibatch
    from megatron_less.trainer.setup import build_run

    cfg = load_config(CONFIG, _overrides(tiny, Path(root) / "parity", "parallel.tp=2", "checkpoint.resume=none",
                                         "batch.micro_batch_tokens=40"))  # fmt: skip
    run = build_run(cfg)
    gen = torch.Generator().manual_seed(0)
    prompts = run.sampler.next_batch(4)
    seqs = [Sequence(g, prompts[g].token_ids, torch.randint(3, 250, (int(n),), generator=gen).tolist(), [], "stop")
            for g in range(4) for n in torch.randint(1, 12, (3,), generator=gen)]  # fmt: skip
    mine, minibatches = phases.place(run, seqs)
    # old log-probs of every response (each rank computes all, so rank 0's reference has them),
    # moved away from the current ones, and mixed-sign advantages: clipping is exercised
    old = phases.old_logprobs(run, seqs)["old_logprobs"]
    old = old + torch.randn(old.shape, generator=gen) * 0.3
    adv = torch.randn(old.shape, generator=gen)
    where = {id(s): i for i, s in enumerate(seqs)}
    order = [where[id(s)] for s in mine]
    spec = LossSpec("ppo_clip", {}, "token-mean", 0.7, run.arch.vocab_size, 12)
    # a mismatch correction that both weights and rejects: the rollout's log-probs moved off the old
    # ones, seq_mask_tis drops the sequences whose geometric-mean ratio leaves [1/1.1, 1.1]
    mask = B.response_mask(seqs)
    corr = apply_correction("seq_mask_tis", old, old + torch.randn(old.shape, generator=gen) * 0.3, mask,
                            geo_threshold=1.1)
    keep, weights = corr.keep & mask, corr.weights
    out = {"rejected": int((~keep.any(-1)).sum()), "seqs": len(seqs)}
    for name, extra in (("plain", {}), ("corrected", {"loss_keep": keep[order], "is_weights": weights[order]})):
        per_token = {"old_logprobs": old[order], "advantages": adv[order], **extra}
        mbs = phases.microbatches(run, mine, minibatches[0], per_token)
        train_minibatch(run.policy, mbs, spec)
        grads = {}
        saved = {}
        for pname, p in run.policy.module.named_parameters():  # read main_grad through the HF-name gatherer
            saved[pname] = p.data
            p.data = p.main_grad.view_as(p).to(p.dtype)
        for hf_name, g in iter_all_hf_tensors(run.policy.module, run.arch):
            grads[hf_name] = g.clone()
        for pname, p in run.policy.module.named_parameters():
            p.data = saved[pname]
        if dist.get_rank() == 0:
            ref = _reference_grads(tiny["hf"], seqs, old, adv, spec, keep if extra else None,
                                   weights if extra else None)  # fmt: skip
            out[name] = {"mbs": [tuple(m.tokens.shape) for m in mbs],
                         "diff": {k: float((grads[k] - ref[k]).abs().max()) for k in ref},
                         "scale": max(float(g.abs().max()) for g in ref.values())}  # fmt: skip
    return out if dist.get_rank() == 0 else None


def _reference_grads(hf_dir, seqs, old, adv, spec, keep=None, weights=None):
    from transformers import Qwen2ForCausalLM

    from megatron_less.algos import get_policy_loss

    model = Qwen2ForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    width = old.shape[1]
    lp = torch.zeros(len(seqs), width)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    rows = []
    for i, s in enumerate(seqs):
        ids = torch.tensor([s.prompt + s.response])
        logits = model(input_ids=ids).logits[0, len(s.prompt) - 1 : -1].float() / spec.temperature
        rows.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.response)[:, None])[:, 0])
        mask[i, : len(s.response)] = True
    lp = torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows])
    if keep is not None:
        mask = mask & keep
    loss, _ = get_policy_loss("ppo_clip")(lp, old, adv, mask, loss_agg_mode="token-mean", rollout_is_weights=weights)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", ["plain", "corrected"])
def test_loss_and_grads_equal_one_process(layouts, case):
    """TP2 x DP2 gradients equal one process's; "corrected": with a mismatch correction's
    weights and rejected sequences carried through micro-batches and ranks."""
    res = layouts["parity"][case]
    assert len({shape for shape in res["mbs"]}) > 1, "micro-batches should differ in shape"
    if case == "corrected":
        assert 0 < layouts["parity"]["rejected"] < layouts["parity"]["seqs"], layouts["parity"]
    worst = max(res["diff"].values())
    assert worst <= 1e-5 * res["scale"] + 1e-7, sorted(res["diff"].items(), key=lambda kv: -kv[1])[:3]


# --- checkpoints and exact resume --------------------------------------------------------------


# exact resume, saves after a resume, layout changes, NaN steps, a full disk, kill -9 of the job:
# tests/test_reliability.py


# --- vLLM as the rollout engine ----------------------------------------------------------------


@pytest.mark.vllm
def test_single_process_train_with_vllm(tiny, tmp_path):
    """A plain process (no torchrun), vLLM generating: steps finish, the log-prob gap between
    vLLM and the trainer's recomputation stays small, the run checkpoints."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("MLESS_REQUIRE_VLLM") == "1":
            raise RuntimeError("MLESS_REQUIRE_VLLM=1 but vllm is not installed")
        pytest.skip("vllm is not installed")
    out = tmp_path / "vllm"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "megatron_less.cli", "train", str(CONFIG),
           *_overrides(tiny, out, "rollout.engine=vllm", "train.steps=2", "rollout.temperature=0.7", "rollout.top_p=0.9")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["mismatch/abs_log_ratio_max"] < 1e-3, r  # fp32 on both sides: a broken sync shows up here
        assert isinstance(r["loss/total"], float), r  # the logger writes non-finite values as strings
    assert (out / "checkpoints" / "step_000002" / "trainer_state.json").is_file()


def test_importing_the_algorithms_leaves_numba_unloaded():
    """numba (llvmlite's ffi object) loaded before a vLLM engine starts breaks vLLM 0.32's CPU
    kernel scan; the LESS kernels load on their first call instead."""
    code = "import sys, megatron_less.algos, megatron_less.trainer.config; print('llvmlite.binding.ffi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def _vllm_tp2_job(tiny, out):
    from megatron_less.trainer.loop import train

    cfg = load_config(CONFIG, _overrides(tiny, out, "rollout.engine=vllm", "parallel.tp=2", "rollout.rollout_tp=2",
                                         "train.steps=2", "rollout.temperature=0.7", "rollout.top_p=0.9"))  # fmt: skip
    run = train(cfg)  # ends by shutting vLLM down, which takes the default group with it
    return run.metrics if os.environ["RANK"] == "0" else None


@pytest.mark.vllm
def test_train_tp2_with_vllm_tp2(tiny, tmp_path):
    """Megatron TP2 and a vLLM TP2 engine in the same two processes: weights synced from the
    shards each step, vLLM's log-probs match the trainer's recomputation."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("MLESS_REQUIRE_VLLM") == "1":
            raise RuntimeError("MLESS_REQUIRE_VLLM=1 but vllm is not installed")
        pytest.skip("vllm is not installed")
    run_distributed(_vllm_tp2_job, 2, (tiny, str(tmp_path / "v2")), timeout=600,
                    env={"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"})  # fmt: skip
    rows = _rows(tmp_path / "v2")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["mismatch/abs_log_ratio_max"] < 1e-3 for r in rows), rows


# --- what a user sees ----------------------------------------------------------------------------


def _noise(text: str) -> list[str]:
    """Lines of third-party warnings and log chatter (Python warnings, vLLM / torch INFO and
    WARNING log lines, C++ warnings of torch.distributed)."""
    import re

    pattern = re.compile(r"Warning\b|warnings\.warn|\bINFO\b|\bWARNING\b|^\[W\d*|^W\d{4} ")
    return [line for line in text.splitlines() if pattern.search(line)]


@pytest.mark.parametrize("engine", ["builtin", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_train_prints_no_third_party_warning_unless_verbose(tiny, tmp_path, engine):
    """`megatron-less train` (tiny config, 1 step, its final checkpoint) shows none of torch's,
    megatron-core's or vLLM's warnings and INFO lines, which a user cannot act on; --verbose
    brings them back."""
    import importlib.util

    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    quieting = ("MLESS_VERBOSE", "PYTHONWARNINGS", "VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY", "TORCH_CPP_LOG_LEVEL")
    env = {k: v for k, v in os.environ.items() if k not in quieting}  # a user's plain shell
    env["OMP_NUM_THREADS"] = "1"

    def run(name, *flags):
        cmd = [sys.executable, "-m", "megatron_less.cli", "train", str(CONFIG), *flags,
               *_overrides(tiny, tmp_path / name, "train.steps=1", f"rollout.engine={engine}", "log.tensorboard=false")]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert [r["step"] for r in _rows(tmp_path / name)] == [1]
        return proc.stdout + proc.stderr

    quiet = run("quiet")
    assert not _noise(quiet), "\n".join(_noise(quiet)[:20])
    loud = run("loud", "--verbose")
    assert "UserWarning" in loud or "FutureWarning" in loud, loud[-4000:]
    if engine == "vllm":
        assert any("INFO" in line for line in _noise(loud)), loud[-4000:]
