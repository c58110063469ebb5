"""The demo's task registry and the column-addition task: references verify, traces parse and
add up, splits are seeded and disjoint, prompts and answers fit the task's token limits."""

from __future__ import annotations

import random

import pytest

from megatron_less.demo import columns, model, task
from megatron_less.demo.tasks import TASKS, Task, get_task
from megatron_less.rewards.math import compute_score


def _rows_across_difficulties(per_digits: int = 60) -> list[dict]:
    rows = []
    for d in range(columns.MIN_DIGITS, columns.MAX_DIGITS + 1):
        rows += columns.problems(per_digits, seed=d, digits=(d,))
    return rows


def test_every_reference_verifies_and_a_wrong_final_digit_scores_zero():
    rows = _rows_across_difficulties()
    assert len(rows) >= 250
    for row in rows:
        ref = columns.target(row)
        assert compute_score(ref, row["answer"]).score == 1.0, ref
        wrong = str(int(row["answer"]) + (1 if row["answer"][-1] != "9" else -1))
        assert wrong != row["answer"]
        assert compute_score(ref.replace(f"\\boxed{{{row['answer']}}}", f"\\boxed{{{wrong}}}"), row["answer"]).score == 0.0


def test_traces_parse_into_one_consistent_step_per_column():
    for row in _rows_across_difficulties(40):
        steps = columns.parse_trace(columns.target(row))
        assert len(steps) == row["digits"] == len(str(row["a"])) == len(str(row["b"]))
        assert [s.place for s in steps] == list(columns.PLACES[: row["digits"]])
        assert all(s.consistent for s in steps)
        assert steps[0].carry_in == 0
        assert all(s.carry_in == prev.carry_out for prev, s in zip(steps, steps[1:]))
        assert [s.a for s in steps] == [int(c) for c in str(row["a"])[::-1]]
        assert [s.b for s in steps] == [int(c) for c in str(row["b"])[::-1]]
        # the written digits, last column first, after the final carry, are the answer
        written = ("1" if steps[-1].carry_out else "") + "".join(str(s.digit) for s in reversed(steps))
        assert written == row["answer"] == str(row["a"] + row["b"])


def test_parse_trace_finds_a_wrong_step_and_refuses_garbage():
    row = columns.make_row(4735, 2896)
    assert columns.target(row) == (
        " ones: 5 + 6 + 0 = 11, write 1 carry 1\n tens: 3 + 9 + 1 = 13, write 3 carry 1\n"
        " hundreds: 7 + 8 + 1 = 16, write 6 carry 1\n thousands: 4 + 2 + 1 = 7, write 7 carry 0\n"
        " answer: \\boxed{7631}"
    )
    bad = columns.target(row).replace("3 + 9 + 1 = 13", "3 + 9 + 1 = 12")
    steps = columns.parse_trace(bad)
    assert [s.consistent for s in steps] == [True, False, True, True]
    with pytest.raises(ValueError, match="line 2"):
        columns.parse_trace(bad.replace(" tens:", " tens;"))
    with pytest.raises(ValueError, match="answer"):
        columns.parse_trace(columns.target(row).replace("\\boxed{7631}", "7631"))
    assert len(columns.parse_trace("garbage\n" + bad, strict=False)) == 4


@pytest.mark.parametrize("seed", [0, 1])
def test_columns_split_is_seeded_disjoint_and_sized(seed):
    train, held = columns.split(seed)
    assert (len(train), len(held)) == (columns.TRAIN_PROBLEMS, columns.HELDOUT_PROBLEMS)
    assert columns.split(seed) == (train, held)
    assert columns.split(seed + 2) != (train, held)
    train_prompts = {r["prompt"] for r in train}
    assert len(train_prompts) == len(train)
    assert len({r["prompt"] for r in held}) == len(held)
    assert not train_prompts & {r["prompt"] for r in held}
    assert {r["digits"] for r in train + held} == set(columns.DIGITS)
    for r in random.Random(seed).sample(train + held, 50):
        assert r["prompt"] == columns.TEMPLATE.format(a=r["a"], b=r["b"])
        assert len(str(r["a"])) == len(str(r["b"])) == r["digits"] and r["answer"] == str(r["a"] + r["b"])


def test_columns_split_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="digits"):
        columns.split(0, digits=(1,))
    with pytest.raises(ValueError, match="too many"):
        columns.split(0, train=4000, heldout=100, digits=(2,))  # 8100 two-digit pairs: at most half


def test_registry_entries_and_unknown_name():
    assert set(TASKS) == {"addition", "columns"}
    assert all(isinstance(t, Task) and TASKS[name] is t and t.name == name for name, t in TASKS.items())
    add = get_task("addition")
    assert (add.split, add.target) == (task.split, task.target)
    assert (add.max_tokens, add.max_prompt_tokens, add.warmup_steps, add.warmup_lr, add.arch) == (24, 32, 300, 1e-3, {})
    assert get_task("columns").target is columns.target
    with pytest.raises(ValueError, match=r"unknown demo task 'nope': valid tasks are addition, columns"):
        get_task("nope")
    with pytest.raises(AttributeError):  # frozen
        add.max_tokens = 1


@pytest.mark.parametrize("name", sorted(TASKS))
def test_prompts_and_answers_fit_the_token_limits(name, tmp_path):
    t = get_task(name)
    train, held = t.split(0)
    arch = dict(model.ARCH, **t.arch)
    tok = model.build_tokenizer(tmp_path, train, t.target, vocab_size=arch["vocab_size"], split_digits=True)
    assert len(tok) <= arch["vocab_size"]
    for row in train[:200] + held:
        prompt = len(tok.encode(row["prompt"], add_special_tokens=False))
        answer = len(tok.encode(t.target(row), add_special_tokens=False)) + 1  # + end of text
        assert prompt <= t.max_prompt_tokens
        assert answer <= t.max_tokens
        assert t.max_prompt_tokens + t.max_tokens <= arch["max_position_embeddings"]
        if name == "columns":
            assert 40 <= answer <= 120, (row, answer)
