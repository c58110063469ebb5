"""The first hour: the embedded task, a short real `megatron-less demo` run (TP2 under torchrun),
the curves it plots and the rollout page it writes, rendered by headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_less.demo import task
from megatron_less.report import plot, run_files, viewer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_task_split_is_disjoint_complete_and_seeded():
    train, heldout = task.split(seed=3)
    assert len(heldout) == 100 and len(train) == 300
    key = lambda r: (r["a"], r["b"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in heldout}
    assert {key(r) for r in train + heldout} == {(a, b) for a in range(20) for b in range(20)}
    assert task.split(seed=3) == (train, heldout) and task.split(seed=4)[1] != heldout
    with pytest.raises(ValueError, match="heldout=400"):
        task.split(seed=0, heldout=400)


def test_the_taught_answer_is_what_the_real_reward_accepts():
    from megatron_less.rewards.math import compute_score

    row = task.problems()[17 * 20 + 5]
    assert row["prompt"] == "What is 17 + 5?\nAnswer:" and task.target(row) == " 17 + 5 = 22. \\boxed{22}"
    assert compute_score(task.target(row), row["answer"]).score == 1.0
    assert compute_score(" 17 + 5 = 23. \\boxed{23}", row["answer"]).score == 0.0


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    """A short demo: a 40-step warm-up, then 2 GRPO + LESS steps at TP2, evaluated before and after."""
    out = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, "-m", "megatron_less.cli", "demo", "--out", str(out), "--warmup-steps", "40",
           "train.steps=2", "eval.every=2", "eval.limit=6", "eval.n=2", "batch.prompts_per_step=4",
           "batch.mini_batch_prompts=4", "log.progress=false"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "train", proc.stdout


def test_demo_trains_at_tp2_and_reports_before_and_after(demo_run):
    run_dir, stdout = demo_run
    rows = run_files.metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert "parallel:\n  tp: 2" in stdout  # the resolved config the job printed
    evals = run_files.evals(run_dir)
    assert [e["step"] for e in evals] == [0, 2]
    assert "held-out problems" in stdout and "avg@2" in stdout and "worst@2" in stdout
    assert (run_dir / "plots" / "curves.png").stat().st_size > 10_000
    assert list((run_dir / "viewer").glob("step_*.html"))


def test_plot_and_view_commands(demo_run, tmp_path):
    from megatron_less.cli import main

    run_dir, _ = demo_run
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "c.png")]) == 0
    import matplotlib.image

    img = matplotlib.image.imread(tmp_path / "c.png")
    assert img.shape[0] > 400 and img.std() > 0.05  # drawn, not a blank canvas
    assert main(["view", str(run_dir), "--step", "1", "--out", str(tmp_path / "p.html")]) == 0
    page = (tmp_path / "p.html").read_text()
    logged = [r for r in run_files.read_jsonl(run_dir / "rollouts.jsonl") if r["step"] == 1]
    assert page.count("class='resp ") == len(logged) > 0
    assert page.count("class='t ") >= sum(len(r["tokens"]) for r in logged)
    assert "<script" not in page and "http" not in page  # self-contained


def test_plot_and_view_name_what_is_missing(tmp_path, capsys):
    from megatron_less.cli import main

    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert main(["view", str(tmp_path / "run")]) == 2
    assert "rollouts.jsonl: not found" in capsys.readouterr().err
    (tmp_path / "run" / "rollouts.jsonl").write_text(json.dumps({"step": 3, "group": 0, "tokens": []}) + "\n{torn")
    assert main(["view", str(tmp_path / "run"), "--step", "5"]) == 2
    assert "step 5: no rollouts logged" in capsys.readouterr().err


def test_viewer_page_renders_in_headless_chromium(demo_run, tmp_path):
    """A real browser draws the page: a screenshot that is not blank and whose legend band shows
    the entropy ramp's orange, and the rendered DOM with the legend and every response."""
    if CHROMIUM is None:
        if os.environ.get("MLESS_REQUIRE_BROWSER") == "1":
            pytest.fail("MLESS_REQUIRE_BROWSER=1 but chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    run_dir, _ = demo_run
    page = viewer.write_page(run_dir, 2, tmp_path / "page.html")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,800"]  # fmt: skip
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout  # fmt: skip
    assert "id=\"legend\"" in dom and dom.count('class="resp ') == len(run_files.rollouts(run_dir, 2)[1])
    import matplotlib.image

    img = matplotlib.image.imread(shot)[..., :3]
    assert img.shape[:2] == (800, 1200) and img.std() > 0.02, "blank screenshot"
    top = img[:200]  # title, meta line and legend
    # the ramp runs white -> rgb(255, 140, 0): count its orange half (about 600 pixels)
    orange = (top[..., 0] > 0.95) & (top[..., 2] < 0.5) & (top[..., 1] - top[..., 2] > 0.2)
    assert orange.sum() > 300, "the legend's entropy ramp is not on screen"


def _synthetic_run(path: Path, new_keys: bool) -> Path:
    """A run folder written by hand: metrics and rollouts with or without the mismatch, dynamic
    sampling and overlong fields."""
    path.mkdir()
    rows = []
    for step in range(1, 7):
        r = {"step": step, "reward/mean": step / 10, "actor/grad_norm": 1.0}
        if new_keys:
            r |= {"mismatch/kl_k3": 1e-5 * 10**step / 10, "mismatch/abs_log_ratio_mean": 0.01,
                  "mismatch/token_frac_past": 0.2, "dynamic/groups_generated": 8, "dynamic/groups_kept": step,
                  "overlong/excluded_frac": 0.1, "correction/weight_mean": 0.98}  # fmt: skip
        rows.append(r)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    resp = {"step": 1, "group": 0, "prompt": "1+1?", "answer": "2", "tokens": ["2", "."], "entropy": [0.1, 0.5],
            "advantage": [0.5, 0.5], "reward": 1.0, "correct": True, "finish_reason": "stop"}  # fmt: skip
    extra = [{}, {"finish_reason": "length"}]
    if new_keys:
        extra = [{"rollout_logprobs": [-0.5, -1.0], "old_logprobs": [-0.25, -1.0]},
                 {"finish_reason": "length", "loss_excluded": True, "rollout_logprobs": [-1.0, -2.0],
                  "old_logprobs": [-1.0, -2.5]}]  # fmt: skip
    (path / "rollouts.jsonl").write_text("".join(json.dumps(resp | e) + "\n" for e in extra))
    return path


@pytest.mark.parametrize("new_keys", [False, True])
def test_plot_draws_the_mismatch_and_dynamic_panels_when_logged(tmp_path, new_keys):
    import matplotlib
    import matplotlib.image

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = _synthetic_run(tmp_path / "run", new_keys)
    axes = []
    real = plt.subplots
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt, "subplots", lambda *a, **k: (lambda fa: axes.append(fa[1]) or fa)(real(*a, **k)))
        png = plot.plot_run(run, tmp_path / "c.png")
    assert matplotlib.image.imread(png).std() > 0.05
    by_title = {ax.get_title(): ax for ax in axes[0].flat}
    mismatch, dynamic = by_title["rollout / trainer mismatch"], by_title["dynamic sampling / overlong"]
    if not new_keys:  # an older run still plots: the new panels say "not logged"
        assert not mismatch.lines and not dynamic.lines
        assert [t.get_text() for t in mismatch.texts] == ["not logged"]
        return
    assert len(mismatch.lines) == 6 and mismatch.get_yscale() == "log"  # kl_k3 spans 5 decades
    kept = dict(zip(*dynamic.lines[0].get_data()))  # thin line: groups kept / generated per step
    assert kept == {s: s / 8 for s in range(1, 7)}
    assert [t.get_text() for t in dynamic.get_legend().get_texts()] == ["groups kept / generated",
                                                                         "truncated, out of the loss"]


@pytest.mark.parametrize("new_keys", [False, True])
def test_viewer_marks_truncated_and_excluded_responses_and_logprob_gaps(tmp_path, new_keys):
    run = _synthetic_run(tmp_path / "run", new_keys)
    _, page = viewer.render(run, 1)
    assert page.count("class='resp ") == 2
    # each badge once in the legend, then on its responses
    assert page.count("class='resp ok cut") == 1 and page.count("class='badge cut'>truncated at max_tokens") == 2
    assert page.count("class='resp ok cut excl'") == int(new_keys)
    assert page.count("class='badge excl'>not in the loss") == 1 + int(new_keys)
    gaps = [t.split("gap |rollout - old| ")[1][:6] for t in page.split("title='")[1:] if "gap |rollout" in t]
    assert gaps == (["0.2500", "0.0000", "0.0000", "0.5000"] if new_keys else [])
    assert "<script" not in page and "http" not in page  # still self-contained


def test_plot_smoothing_is_a_trailing_mean():
    assert plot.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_compare_table_intervals_and_paired_differences():
    from megatron_less.demo.compare import table

    # grpo avg@8 over seeds 0.5, 0.7, 0.6: mean 0.6, s 0.1, half-width t(2) 4.303 * 0.1 / sqrt(3) = 0.248
    # less - grpo per seed: +0.1, +0.1, +0.1 -> mean 0.1, s 0: no spread to judge by ("="), 3 of 3 won
    # std@8: less - grpo = -0.1, 0, +0.1 -> mean 0, half 4.303 * 0.1 / sqrt(3) = 0.248; wins: lower is better -> 1
    grpo = {s: {"avg@8": a, "avg@8 start": 0.3, "std@8": 0.2, "std@8 start": 0.3} for s, a in enumerate([0.5, 0.7, 0.6])}
    less = {s: {"avg@8": a + 0.1, "avg@8 start": 0.3, "std@8": 0.2 + d, "std@8 start": 0.3}
            for (s, a), d in zip(enumerate([0.5, 0.7, 0.6]), [-0.1, 0.0, 0.1])}  # fmt: skip
    # dapo - grpo: +0.10, +0.12, +0.11 -> mean 0.11, s 0.01, half 4.303 * 0.01 / sqrt(3) = 0.025: excludes zero
    dapo = {s: {**m, "avg@8": m["avg@8"] + d} for (s, m), d in zip(grpo.items(), [0.10, 0.12, 0.11])}
    lines = table({"grpo": grpo, "less": less, "dapo": dapo}).splitlines()
    assert next(line for line in lines if line.startswith("dapo") and "/3" in line).split()[1:6] == [
        "+0.110", "±", "0.025", "3/3", "*"]
    assert lines[1].split() == ["method", "avg@8", "std@8", "seeds"]
    assert lines[2].split() == ["grpo", "0.600", "±", "0.248", "(+0.300)", "0.200", "±", "0.000", "(-0.100)", "3"]
    row = next(line for line in lines if line.startswith("less") and "/3" in line).split()
    assert row[1:6] == ["+0.100", "±", "0.000", "3/3", "="]
    assert row[6:] == ["+0.000", "±", "0.248", "1/3", "~0"]


def test_seed_intervals():
    from megatron_less.eval.seeds import mean_interval, paired, t975

    iv = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # s = 1.5811, t(4) = 2.776 -> 2.776 * 1.5811 / sqrt(5) = 1.963
    assert (iv.mean, round(iv.half, 3), iv.includes_zero()) == (3.0, 1.963, False)
    assert mean_interval([0.2]).includes_zero() and str(mean_interval([0.2])) == "0.200 (1 seed)"
    assert t975(1) == 12.706 and t975(100) == 1.96
    pr = paired({0: 0.5, 1: 0.4, 2: 0.9}, {0: 0.4, 1: 0.4, 2: 0.6, 3: 0.1})  # seed 3 unpaired: left out
    assert (pr.n, pr.wins, pr.ties, round(pr.diff.mean, 6)) == (3, 2, 1, round(0.4 / 3, 6))
    with pytest.raises(ValueError, match="share no seed"):
        paired({0: 1.0}, {1: 1.0})


@pytest.mark.slow
def test_compare_quick_on_the_chain_task(tmp_path):
    """`compare --quick --task chain`: two seeds, GRPO and DAPO, a few steps; the table (with
    its paired differences) and the PNG are produced. It asserts nothing about who wins."""
    cmd = [sys.executable, "-m", "megatron_less.cli", "compare", "--out", str(tmp_path), "--task", "chain", "--quick",
           "--methods", "grpo,dapo"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "compare.txt").read_text()
    assert "paired differences against grpo" in text and text.count("± ") >= 6, text
    assert {"grpo", "dapo", "avg@2", "worst@2", "std@2"} <= set(text.split()), text
    assert json.loads((tmp_path / "compare.json").read_text())["task"] == "chain"
    assert (tmp_path / "compare.png").stat().st_size > 5000