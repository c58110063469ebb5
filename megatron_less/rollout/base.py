"""The rollout interface: prompts in, sampled responses with their log-probs out.

The log-prob contract, the same for every engine and any temperature, top-p and top-k: each
returned log-prob is log softmax(logits / T)[token] over the full (real) vocabulary - the
tempered distribution *before* top-k/top-p truncation, not renormalised over the kept set.
That is what the trainer recomputes as its old log-probs. Greedy (T = 0): log softmax(logits).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 1024
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def request_seed(self, prompt_index: int, sample_index: int) -> int:
        """One seed per request: samples of a prompt must not share a random stream, and every
        TP rank of an engine must draw the same numbers."""
        return (self.seed * 1_000_003 + prompt_index * 65_537 + sample_index) % (2**31 - 1)


@dataclass
class Response:
    token_ids: list[int]
    logprobs: list[float]  # per token, log softmax(logits / T) over the full vocabulary
    finish_reason: str  # "stop" (a stop token was sampled, and is included) or "length"
    extra: dict = field(default_factory=dict)


class RolloutEngine(abc.ABC):
    # whether generate calls on_finish as each response finishes (else: it is not called)
    streams = False

    @abc.abstractmethod
    def generate(
        self, prompts: list[list[int]], n: int, params: SamplingParams, on_finish=None
    ) -> list[list[Response]]:
        """``n`` responses for each prompt (token ids), in prompt order, each token with its
        log-prob as the module docstring defines it (untruncated, tempered). Collective: every
        rank of the job calls it with the same prompts and gets every result back. An engine
        that ``streams`` calls ``on_finish(i, j, response)`` for response j of prompt i as soon
        as it is done, exactly once in the whole job (on one rank of the replica that made it)."""

    @abc.abstractmethod
    def sync_weights(self, model) -> dict:
        """Make the engine sample from the weights of the Megatron ``model`` (this rank's stage
        and shard). Collective. Returns timing/size figures."""

    def sleep(self) -> None:
        """Free rollout memory while training (no-op where unsupported)."""

    def wake_up(self) -> None:
        """Undo ``sleep`` before the next ``generate``."""

    def checkpoint_state(self) -> dict:
        """What a training checkpoint must keep of the engine to resume exactly (JSON data)."""
        return {}
