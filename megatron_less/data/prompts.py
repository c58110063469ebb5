"""Prompt templates for math problems.

``qwen_math``: the Qwen2.5-Math chain-of-thought chat prompt (the system message below, the
problem as the user turn, then the assistant header). Rendered with the tokenizer's own chat
template when it has one, so that a model sees exactly what it was tuned on; otherwise written
out as Qwen's ChatML by hand, which is the same text for Qwen2.5 models.

``plain``: for base models without a chat format.

``none``: the problem text as is (for files that already hold rendered prompts).
"""

from __future__ import annotations

from typing import Callable

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def chatml(messages: list[dict]) -> str:
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(parts) + "<|im_start|>assistant\n"


def qwen_math(problem: str, tokenizer=None) -> str:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": problem}]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return chatml(messages)


def plain(problem: str, tokenizer=None) -> str:
    return f"Question: {problem}\n{SYSTEM_PROMPT}\nAnswer: Let's think step by step."


def raw(problem: str, tokenizer=None) -> str:
    return problem


TEMPLATES: dict[str, Callable[..., str]] = {"qwen_math": qwen_math, "plain": plain, "none": raw}


def apply_template(name: str, problem: str, tokenizer=None) -> str:
    try:
        fn = TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"unknown prompt template {name!r}; choose from {sorted(TEMPLATES)}"
        ) from None
    return fn(problem, tokenizer)
