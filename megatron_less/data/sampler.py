"""Training prompts in a seeded, resumable order: each epoch is a permutation drawn from
(seed, epoch), so the position (epoch, index) is the whole state a checkpoint needs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_less.data.prompts import apply_template
from megatron_less.data.records import DataError
from megatron_less.data.train_file import read_train_file


@dataclass
class Prompt:
    index: int  # row of the training file
    token_ids: list[int]
    text: str
    answer: str


def load_prompts(path, tokenizer, *, template: str, max_prompt_tokens: int, skip_bad: bool) -> tuple[list, dict]:
    """Tokenised prompts and counts of what was dropped. Rows written with template "none" are
    rendered with ``template`` here; rows already rendered are used as they are."""
    rows, stats = read_train_file(path, skip_bad=skip_bad)
    prompts, too_long = [], 0
    for i, row in enumerate(rows):
        text = row["prompt"]
        if row.get("template", "none") == "none":
            text = apply_template(template, text, tokenizer)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise DataError(f"{path}: row {i + 1} has a prompt that tokenises to nothing")
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        prompts.append(Prompt(i, ids, text, row["answer"]))
    if not prompts:
        raise DataError(f"{path}: no usable prompt ({len(rows)} rows, {too_long} over data.max_prompt_tokens)")
    return prompts, {"rows": stats.rows, "bad_rows": stats.skipped, "too_long": too_long}


class PromptSampler:
    def __init__(self, prompts: list[Prompt], seed: int, shuffle: bool = True):
        self.prompts, self.seed, self.shuffle = prompts, seed, shuffle
        self.epoch, self.index = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.prompts)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def next_batch(self, size: int) -> list[Prompt]:
        """The next ``size`` prompts, crossing into the next epoch when this one runs out."""
        out = []
        while len(out) < size:
            order = self._order(self.epoch)
            take = order[self.index : self.index + size - len(out)]
            out += [self.prompts[i] for i in take]
            self.index += len(take)
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_prompts"] != len(self.prompts):
            raise DataError(
                f"the checkpoint's data position is for {state['num_prompts']} prompts, the training file "
                f"now gives {len(self.prompts)}: resuming would not continue the same order"
            )
        self.epoch, self.index, self.seed = state["epoch"], state["index"], state["seed"]
