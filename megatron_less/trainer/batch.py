"""From a rollout batch to what the model and the losses take.

Placement: the rollout batch is cut into optimizer mini-batches of whole prompts; inside each, the
prompts' groups (all n responses of a prompt) go to data-parallel ranks, the same number to each,
balanced by token count. A group never spans ranks, so group statistics and LESS need no
cross-rank gather.

Micro-batches: a rank's sequences (prompt + response) sorted by length and grouped greedily under
a token budget (rows x longest row), each padded only to its own longest row. Right padding under
a causal mask leaves the real positions untouched, so results equal the unpadded computation.
Packed (``batch.packing``): sequences back to back in one row of at most the budget's tokens
(first-fit decreasing), with their lengths; the model sees where each starts (models.packing), so
no token attends across a boundary and nothing is spent on padding but the row's tail (a multiple
of TP under sequence parallelism). Per-token values are kept per response, [B, T_resp] padded
("response layout"); a micro-batch lays them out on the logits' positions: the token at sequence
position p is predicted at p - 1.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch


@dataclass
class Sequence:
    group: int  # prompt index inside the rollout batch
    prompt: list[int]
    response: list[int]
    rollout_logprobs: list[float]
    finish_reason: str
    reward: float = 0.0
    correct: bool = False
    scored: str = "ok"  # ok | no_answer | timeout | error
    penalty: float = 0.0  # reward shaping (the overlong penalty) included in reward

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.response)


def assign_groups(group_tokens: list[int], mini_batch_prompts: int, dp: int) -> list[list[list[int]]]:
    """[mini-batch][dp rank] -> group ids. Equal counts per rank; largest groups first to the
    least-loaded rank with room (deterministic: ties go to the lower rank / group id)."""
    out = []
    if len(group_tokens) % dp:
        raise ValueError(f"{len(group_tokens)} groups cannot be shared equally by {dp} data-parallel ranks")
    for start in range(0, len(group_tokens), mini_batch_prompts):
        ids = range(start, min(start + mini_batch_prompts, len(group_tokens)))
        per_rank = len(ids) // dp  # a short last mini-batch (dynamic sampling) is shared equally too
        load, ranks = [0] * dp, [[] for _ in range(dp)]
        for g in sorted(ids, key=lambda g: (-group_tokens[g], g)):
            r = min((r for r in range(dp) if len(ranks[r]) < per_rank), key=lambda r: (load[r], r))
            ranks[r].append(g)
            load[r] += group_tokens[g]
        out.append([sorted(r) for r in ranks])
    return out


def response_matrix(rows: list[list], dtype, pad=0) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), pad, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=dtype)
    return out


def response_mask(seqs: list[Sequence]) -> torch.Tensor:
    """[N, T_resp] True on each response's tokens (response layout)."""
    return response_matrix([[True] * len(s.response) for s in seqs], torch.bool, False)


@dataclass
class MicroBatch:
    rows: list[int]  # indices into the rank's sequence list
    tokens: torch.Tensor  # [b, S] prompt + response, right-padded
    target: torch.Tensor  # [b, S-1] = tokens[:, 1:]
    loss_mask: torch.Tensor  # [b, S-1] True where the target is a response token
    extra: dict = field(default_factory=dict)  # per-token values in the logits layout [b, S-1]
    lengths: list[int] | None = None  # packed: one row, these sequences back to back; None: a row each

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def places(self) -> list[tuple[int, int]]:
        """(row, offset) where each of ``rows``' sequences starts."""
        return row_places(self.lengths, len(self.rows))


def row_places(packed_lengths: list[int] | None, n: int) -> list[tuple[int, int]]:
    """(row, offset) of each of ``n`` sequences: back to back in row 0 when packed (their
    lengths given), else a row each."""
    if packed_lengths is None:
        return [(k, 0) for k in range(n)]
    return [(0, at) for at in itertools.accumulate([0, *packed_lengths[:-1]])]


def plan_microbatches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Rows grouped so that rows x longest row <= budget (a longer row goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    plans, cur, longest = [], [], 0
    for i in order:
        wider = max(longest, lengths[i])
        if cur and wider * (len(cur) + 1) > token_budget:
            plans.append(cur)
            cur, wider = [], lengths[i]
        cur.append(i)
        longest = wider
    if cur:
        plans.append(cur)
    return plans


def plan_packs(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Rows grouped so that each group's total length <= budget: first-fit decreasing (a row
    longer than the budget goes alone); each group in row order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        b = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
        if b is None:
            bins.append([])
            room.append(token_budget)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return [sorted(b) for b in bins]


def build_microbatch(seqs: list[Sequence], rows: list[int], per_token: dict[str, torch.Tensor], *,
                     multiple: int = 1, packed: bool = False) -> MicroBatch:
    """``per_token``: name -> [N, T_resp] tensors in response layout over all of ``seqs``.
    ``multiple``: the width is padded up to a multiple of it (sequence parallelism: the TP size).
    ``packed``: ``rows``' sequences back to back in one row, else one row each."""
    chosen = [seqs[i] for i in rows]
    lengths = [s.length for s in chosen] if packed else None
    width = sum(lengths) if packed else max(s.length for s in chosen)
    width += -width % multiple
    n_rows = 1 if packed else len(chosen)
    tokens = torch.zeros(n_rows, width, dtype=torch.long)
    # every sequence has a prompt token and a response token, so width >= 2
    mask = torch.zeros(n_rows, width - 1, dtype=torch.bool)
    extra = {k: torch.zeros(n_rows, width - 1, dtype=v.dtype) for k, v in per_token.items()}
    for k, (s, (row, at)) in enumerate(zip(chosen, row_places(lengths, len(chosen)))):
        p, r = len(s.prompt), len(s.response)
        tokens[row, at : at + s.length] = torch.tensor(s.prompt + s.response)
        mask[row, at + p - 1 : at + p - 1 + r] = True
        for name, v in per_token.items():
            extra[name][row, at + p - 1 : at + p - 1 + r] = v[rows[k], :r]
    # across a packed boundary the target is the next sequence's first token: outside the mask
    return MicroBatch(rows, tokens, tokens[:, 1:], mask, extra, lengths)


def to_response_layout(mb: MicroBatch, values: torch.Tensor, seqs: list[Sequence], out: torch.Tensor) -> None:
    """Scatter [b, S-1] logits-layout values of ``mb`` back into ``out`` [N, T_resp]."""
    for i, (row, at) in zip(mb.rows, mb.places()):
        p, r = len(seqs[i].prompt), len(seqs[i].response)
        out[i, :r] = values[row, at + p - 1 : at + p - 1 + r]
