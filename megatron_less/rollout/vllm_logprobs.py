"""Make vLLM return log softmax(logits / T)[token] over the full vocabulary for every sampled token.

vLLM 0.32 has no log-prob mode with that meaning: ``raw_logprobs`` ignore the temperature,
``processed_logprobs`` are renormalised over what top-k/top-p kept, ``processed_logits`` are
z / T after truncation (masked entries -inf, kept ones untouched). So the temperature moves
into a logits processor: for each of our requests it replaces the row by log_softmax(z / T)
(greedy, T = 0: log_softmax(z)), and vLLM is asked for temperature 1 (0 for greedy). A
row-wise shift changes neither the sampled distribution nor the argmax, top-k or top-p, and
dividing by 1 is exact; so vLLM samples exactly what it would at T, and the ``processed_logits``
it returns for the sampled token - a kept entry, untouched by truncation - is the log-prob.

vLLM runs the processor before penalties (V1 runner), so a request with a repetition penalty
(which scales positive and negative logits differently) is refused rather than changed.

Two model runners, two processor interfaces: V1 (CPU, and GPU without triton) keys state by
batch row and calls ``update_state`` / ``apply(logits)``; V2 (GPU default) keys it by request
slot and calls ``add_request`` / ``apply(logits, ctx)``. One class implements both, so vLLM's
own choice of runner decides which half runs.
"""

from __future__ import annotations

import math

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor as _V1
from vllm.v1.sample.logits_processor.builtin import process_dict_updates
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as _V2

# SamplingParams.extra_args key carrying our temperature; requests without it are left alone
KEY = "megatron_less_temperature"


def request_temperature(params) -> float | None:
    """The temperature the processor applies to a request, or None when it is not ours."""
    t = (params.extra_args or {}).get(KEY)
    return None if t is None else float(t)


class TemperedLogProbs(_V1, _V2):
    def __init__(self, vllm_config, *runner_args):
        if len(runner_args) == 1:  # V2: (req_states)
            req_states = runner_args[0]
            # per request slot; NaN: not ours
            self._slot_t = torch.full((req_states.max_num_reqs,), math.nan)
            self._slot_t_dev = self._slot_t.to(req_states.device)
        else:  # V1: (device, is_pin_memory)
            self._row_t: dict[int, float] = {}  # batch row -> divisor
            self._rows = None  # (row index, divisors) tensors, rebuilt when the batch changes

    @classmethod
    def validate_params(cls, params) -> None:
        if request_temperature(params) is not None and params.repetition_penalty != 1.0:
            raise ValueError("megatron-less rollouts take no repetition penalty (it would act on log-probs)")

    def is_argmax_invariant(self) -> bool:
        # It is, but vLLM would then run it after its own temperature and skip it for greedy
        # batches; declared otherwise it runs on every batch, on untempered logits.
        return False

    # -- V1 ------------------------------------------------------------------------------------
    def update_state(self, batch_update) -> None:
        def divisor(params, _prompt, _output):
            t = request_temperature(params)
            return None if t is None else (t if t > 0 else 1.0)  # greedy: scored at T = 1

        if process_dict_updates(self._row_t, batch_update, divisor):
            self._rows = None

    # -- V2 ------------------------------------------------------------------------------------
    def add_request(self, req_idx: int, sampling_params) -> bool:
        t = request_temperature(sampling_params)
        self._slot_t[req_idx] = math.nan if t is None else (t if t > 0 else 1.0)
        return t is not None

    def apply_staged_writes(self) -> None:
        self._slot_t_dev.copy_(self._slot_t, non_blocking=True)

    # -- both ----------------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is not None:  # V2: every row, ours selected by slot
            t = self._slot_t_dev[ctx.expanded_idx_mapping.long()].unsqueeze(1)
            ours = ~torch.isnan(t)
            tempered = torch.log_softmax(logits / torch.where(ours, t, 1.0), dim=-1)
            return torch.where(ours, tempered, logits)
        if not self._row_t:
            return logits
        if self._rows is None:
            rows = sorted(self._row_t)
            self._rows = (torch.tensor(rows, device=logits.device),
                          torch.tensor([self._row_t[r] for r in rows], device=logits.device).unsqueeze(1))
        idx, t = self._rows
        # z / T, not z * (1/T): the division the trainer's recomputation does
        logits[idx] = torch.log_softmax(logits[idx] / t, dim=-1)
        return logits
