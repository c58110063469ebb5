"""A sampler that generates with the Megatron policy itself: the reference for the vLLM bridge and
the engine for tests and tiny models. No KV cache: every step re-runs the whole sequence, which
is exact and simple, and fast enough for the tiny models it serves.

Sequences are right-padded into one batch; under a causal mask the padding cannot affect the
real positions, so each sequence reads its next-token logits at its own last position.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from megatron_less.models.schedule import forward_logits
from megatron_less.models.qwen2 import Qwen2Arch
from megatron_less.rollout.base import Response, RolloutEngine, SamplingParams
from megatron_less.rollout.sampling import sample_next


class BuiltinSampler(RolloutEngine):
    def __init__(self, model_chunks: list, arch: Qwen2Arch, *, batch_size: int = 64):
        self.model = model_chunks
        self.arch = arch
        self.batch_size = batch_size

    def sync_weights(self, model) -> dict:
        # Generates with the live policy: nothing to copy.
        self.model = model if isinstance(model, list) else [model]
        return {"seconds": 0.0, "bytes": 0}

    @torch.no_grad()
    def generate(self, prompts, n, params: SamplingParams, on_finish=None):  # whole batches: no streaming
        from megatron.core import parallel_state as ps

        requests = [(i, j, list(p)) for i, p in enumerate(prompts) for j in range(n)]
        # Data-parallel replicas split the requests; every model-parallel rank of a replica
        # runs the same requests.
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mine = requests[dp_rank::dp]
        done: dict[tuple[int, int], Response] = {}
        for start in range(0, len(mine), self.batch_size):
            batch = mine[start : start + self.batch_size]
            for (i, j, _), resp in zip(batch, self._generate_batch([r[2] for r in batch], [(i, j) for i, j, _ in batch], params)):
                done[(i, j)] = resp
        if dp > 1:
            parts = [None] * dp
            dist.all_gather_object(parts, done, group=ps.get_data_parallel_group())
            done = {k: v for part in parts for k, v in part.items()}
        return [[done[(i, j)] for j in range(n)] for i in range(len(prompts))]

    def _device(self) -> torch.device:
        return next(self.model[0].parameters()).device

    def _full_logits(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor | None:
        """Next-token logits [B, V] at positions ``last`` (real vocabulary only)."""
        from megatron.core import parallel_state as ps

        logits = forward_logits(self.model, tokens.to(self._device()))
        if logits is None:
            return None
        idx = torch.arange(tokens.shape[0], device=logits.device)
        rows = logits[idx, last.to(logits.device)].float()
        tp = ps.get_tensor_model_parallel_world_size()
        if tp > 1:
            shards = [torch.empty_like(rows) for _ in range(tp)]
            dist.all_gather(shards, rows.contiguous(), group=ps.get_tensor_model_parallel_group())
            rows = torch.cat(shards, dim=-1)
        return rows[:, : self.arch.vocab_size].cpu()  # padded vocabulary rows are not tokens

    def _generate_batch(self, prompts, keys, params: SamplingParams) -> list[Response]:
        from megatron.core import parallel_state as ps

        b = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts])
        if int(lengths.min()) < 1:
            raise ValueError("every prompt needs at least one token")
        total = int(lengths.max()) + params.max_tokens
        tokens = torch.zeros(b, total, dtype=torch.long)
        for k, p in enumerate(prompts):
            tokens[k, : len(p)] = torch.tensor(p)
        gens = [torch.Generator().manual_seed(params.request_seed(i, j)) for i, j in keys]
        out_tokens: list[list[int]] = [[] for _ in range(b)]
        out_lp: list[list[float]] = [[] for _ in range(b)]
        finished = [False] * b
        stop = set(params.stop_token_ids)
        last_stage = ps.is_pipeline_last_stage()
        pp_group = ps.get_pipeline_model_parallel_group()
        for _ in range(params.max_tokens):
            cur = lengths + torch.tensor([len(o) for o in out_tokens])
            width = int(cur.max())
            logits = self._full_logits(tokens[:, :width], cur - 1)
            picked = torch.zeros(b, dtype=torch.long)
            logps = torch.zeros(b, dtype=torch.float32)
            if last_stage:
                for k in range(b):
                    if not finished[k]:
                        picked[k], logps[k] = sample_next(logits[k], params, gens[k])
            if ps.get_pipeline_model_parallel_world_size() > 1:
                both = torch.stack([picked.float(), logps]).to(self._device())  # nccl: on GPU
                dist.broadcast(both, ps.get_pipeline_model_parallel_last_rank(), group=pp_group)
                picked, logps = both[0].long().cpu(), both[1].cpu()
            for k in range(b):
                if finished[k]:
                    continue
                tok = int(picked[k])
                tokens[k, cur[k]] = tok
                out_tokens[k].append(tok)
                out_lp[k].append(float(logps[k]))
                if tok in stop:
                    finished[k] = True
            if all(finished):
                break
        return [
            Response(t, lp, "stop" if (t and t[-1] in stop) else "length")
            for t, lp in zip(out_tokens, out_lp)
        ]
