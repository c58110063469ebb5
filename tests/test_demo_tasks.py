"""The demo's task registry and the column-addition task: references verify, traces parse and
add up, splits are seeded and disjoint, prompts and answers fit the task's token limits."""

from __future__ import annotations

import math
import random

import pytest

from megatron_less.demo import chain, columns, model, task
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
    assert set(TASKS) == {"addition", "columns", "chain"}
    assert all(isinstance(t, Task) and TASKS[name] is t and t.name == name for name, t in TASKS.items())
    add = get_task("addition")
    assert (add.split, add.target) == (task.split, task.target)
    assert (add.max_tokens, add.max_prompt_tokens, add.warmup_steps, add.warmup_lr, add.arch) == (24, 32, 300, 1e-3, {})
    assert get_task("columns").target is columns.target
    assert (get_task("chain").split, get_task("chain").target) == (chain.split, chain.target)
    with pytest.raises(ValueError, match=r"unknown demo task 'nope': valid tasks are addition, chain, columns"):
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
        if name == "chain":  # 5 operands: 39-47 tokens, 6: 51-57
            assert 39 <= answer <= 60, (row, answer)


# --- the running-sum task (megatron_less/demo/chain.py) ---


def _chain_rows(per_count: int = 40) -> list[dict]:
    rows = []
    for k in range(chain.MIN_OPERANDS, chain.MAX_OPERANDS + 1):
        rows += chain.problems(min(per_count, math.perm(chain.HIGH - chain.LOW + 1, k) // 2), seed=k, operands=(k,))
    return rows


def test_chain_references_verify_and_a_wrong_sum_scores_zero():
    rows = _chain_rows()
    assert len(rows) >= 300
    for row in rows:
        ref = chain.target(row)
        assert compute_score(ref, row["answer"]).score == 1.0, ref
        wrong = str(int(row["answer"]) + 1)
        assert compute_score(ref.replace(f"\\boxed{{{row['answer']}}}", f"\\boxed{{{wrong}}}"), row["answer"]).score == 0.0
        # a trace whose last line is off by one boxes a wrong sum: 0
        steps = chain.steps(row["terms"])
        off = steps[:-1] + [chain.Step(steps[-1].total, steps[-1].operand, steps[-1].result - 1)]
        assert compute_score(chain.render(off, str(off[-1].result)), row["answer"]).score == 0.0


def test_chain_traces_parse_into_one_consistent_line_per_operand():
    for row in _chain_rows(30):
        steps = chain.parse_trace(chain.target(row))
        assert len(steps) == row["operands"] - 1 == len(row["terms"]) - 1
        assert steps[0].total == row["terms"][0]
        assert [s.operand for s in steps] == row["terms"][1:]
        assert all(s.consistent for s in steps) and chain.chained(steps)
        assert steps[-1].result == int(row["answer"]) == sum(row["terms"])


def test_chain_example_and_parse_finds_a_wrong_line_and_refuses_garbage():
    row = chain.make_row([3, 5, 9, 2, 7, 4])
    assert row["prompt"] == "What is 3 + 5 + 9 + 2 + 7 + 4?\nAnswer:" and row["answer"] == "30"
    ref = chain.target(row)
    assert ref == " 3 + 5 = 8\n 8 + 9 = 17\n 17 + 2 = 19\n 19 + 7 = 26\n 26 + 4 = 30\n \\boxed{30}"
    assert chain.parse_trace(ref)[1] == chain.Step(8, 9, 17)
    bad = ref.replace("8 + 9 = 17", "8 + 9 = 16")
    steps = chain.parse_trace(bad)
    assert [s.consistent for s in steps] == [True, False, True, True, True]
    assert not chain.chained(steps)
    # consistent lines that do not carry the running total on are not a chain
    assert not chain.chained(chain.parse_trace(ref.replace(" 17 + 2 = 19\n", " 16 + 2 = 18\n")))
    with pytest.raises(ValueError, match="line 3"):
        chain.parse_trace(ref.replace(" 17 + 2", " 17 plus 2"))
    with pytest.raises(ValueError, match="answer"):
        chain.parse_trace(ref.replace("\\boxed{30}", "30"))
    assert len(chain.parse_trace("garbage\n" + bad, strict=False)) == 5


def test_chain_make_row_refuses_bad_operands():
    for terms in ([3], [0, 4], [10, 1], [3, 3, 4], list(range(1, 11))):
        with pytest.raises(ValueError):
            chain.make_row(terms)


@pytest.mark.parametrize("seed", [0, 1])
def test_chain_split_is_seeded_disjoint_and_sized(seed):
    train, held = chain.split(seed)
    assert (len(train), len(held)) == (chain.TRAIN_PROBLEMS, chain.HELDOUT_PROBLEMS)
    assert chain.split(seed) == (train, held)
    assert chain.split(seed + 2) != (train, held)
    train_prompts = {r["prompt"] for r in train}
    assert len(train_prompts) == len(train)
    assert len({r["prompt"] for r in held}) == len(held)
    assert not train_prompts & {r["prompt"] for r in held}
    assert {r["operands"] for r in train + held} == set(chain.OPERANDS)
    for r in random.Random(seed).sample(train + held, 50):
        assert r == chain.make_row(r["terms"])
        assert len(set(r["terms"])) == len(r["terms"]) == r["operands"]
        assert all(chain.LOW <= t <= chain.HIGH for t in r["terms"])


def test_chain_split_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="operands"):
        chain.split(0, operands=(1,))
    with pytest.raises(ValueError, match="operands"):
        chain.split(0, operands=(10,))
    with pytest.raises(ValueError, match="too many"):
        chain.split(0, train=4000, heldout=100, operands=(3,))  # 504 ordered triples of distinct digits
