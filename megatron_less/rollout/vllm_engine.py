"""vLLM colocated with the trainer, torchrun-style (SPMD).

Every rank of the job builds one in-process engine (``external_launcher``: vLLM joins the
existing torch.distributed world, consecutive ranks form a rollout-TP group). Rollout TP may
differ from training TP; rollout replicas (world / rollout TP) split the prompts and the results
are gathered back to every rank. Weights go from the Megatron shards to vLLM in memory, gathered
per layer in bounded buckets and streamed into ONE call of vLLM's in-place ``reload_weights`` per
sync — never through disk. (One call per bucket would make vLLM fall back to the old tensors of,
and warn about, every module the bucket lacks: thousands of warnings per step at 0.5B.)

Sleep (GPU): level 2 discards the weights instead of copying them to host and back, since the
sync overwrites all of them; the sync wakes the weights' memory first (its contents undefined),
loads every weight, and only then wakes the KV cache. vLLM keeps its buffers (rotary tables)
across the sleep itself. A sync that leaves a module without weights is an error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time

import torch
import torch.distributed as dist

from megatron_less.models.qwen2 import Qwen2Arch
from megatron_less.parallel.gather import iter_all_hf_tensors
from megatron_less.rollout.base import Response, RolloutEngine, SamplingParams


def hf_config_dict(arch: Qwen2Arch, dtype: str = "float32") -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "hidden_act": arch.hidden_act,
        "torch_dtype": dtype,
        "use_sliding_window": False,
    }


class VLLMEngine(RolloutEngine):
    def __init__(
        self,
        arch: Qwen2Arch,
        *,
        rollout_tp: int = 1,
        dtype: str = "float32",
        max_model_len: int | None = None,
        kv_cache_bytes: int | None = None,
        gpu_memory_utilization: float = 0.5,
        bucket_bytes: int = 512 << 20,
        seed: int = 0,
        enable_sleep_mode: bool | None = None,
    ):
        if arch.head_dim * arch.num_attention_heads != arch.hidden_size:
            # vLLM's Qwen2 derives head_dim from hidden_size / heads and would load silently wrong.
            raise ValueError(
                f"vLLM's Qwen2 needs head_dim * num_attention_heads == hidden_size, got "
                f"{arch.head_dim} * {arch.num_attention_heads} != {arch.hidden_size}"
            )
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world % rollout_tp:
            raise ValueError(f"rollout_tp ({rollout_tp}) must divide the world size ({world})")
        from vllm import LLM

        from megatron_less.rollout.vllm_logprobs import TemperedLogProbs

        self.arch = arch
        self.rollout_tp = rollout_tp
        self.bucket_bytes = bucket_bytes
        on_gpu = torch.cuda.is_available()
        self.sleep_mode = on_gpu if enable_sleep_mode is None else enable_sleep_mode and on_gpu
        self._dir = tempfile.mkdtemp(prefix="mless-vllm-")
        with open(os.path.join(self._dir, "config.json"), "w") as f:
            json.dump(hf_config_dict(arch, dtype), f)
        kw = dict(
            model=self._dir,
            skip_tokenizer_init=True,
            load_format="dummy",  # real weights arrive through sync_weights
            dtype=dtype,
            tensor_parallel_size=rollout_tp,
            distributed_executor_backend="external_launcher",
            max_model_len=min(max_model_len or arch.max_position_embeddings, arch.max_position_embeddings),
            seed=seed,
            enforce_eager=not on_gpu,
            # the processor turns rows into log_softmax(z / T); the sampled token's processed
            # logit is then its log-prob over the full vocabulary (see vllm_logprobs.py)
            logprobs_mode="processed_logits",
            logits_processors=[TemperedLogProbs],
            enable_prefix_caching=True,
        )
        if on_gpu:
            kw.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_mode)
        else:
            # CPU: automatic KV sizing refuses to start beside the trainer; size it explicitly.
            kw["kv_cache_memory_bytes"] = kv_cache_bytes or (256 << 20)
            # a prefill split across steps rewinds the request's seeded generator, and a CPU
            # generator has no offset to rewind (vLLM 0.32 raises): whole prefills only
            kw.update(enable_chunked_prefill=False, max_num_batched_tokens=max(kw["max_model_len"], 8192))
        if kv_cache_bytes and on_gpu:
            kw["kv_cache_memory_bytes"] = kv_cache_bytes
        if rollout_tp > 1:
            # vLLM's custom all-reduce keeps IPC buffers outside the sleep allocator's pool; peers
            # turn it off beside sleep mode (vLLM's CPU platform always does)
            kw["disable_custom_all_reduce"] = True
        self.engine_kwargs = kw
        self.llm = LLM(**kw)
        self._sleeping: set[str] = set()  # vLLM's sleep tags not yet woken: "weights", "kv_cache"
        self._weights_current = True  # False from a level-2 sleep until the next sync

    # -- generation ---------------------------------------------------------------------------
    def _replica_leader(self) -> bool:
        """One rank per rollout replica reports a finished response (its TP ranks all see it)."""
        return not dist.is_initialized() or dist.get_rank() % self.rollout_tp == 0

    def _replica(self) -> tuple[int, int]:
        if not dist.is_initialized():
            return 0, 1
        return dist.get_rank() // self.rollout_tp, dist.get_world_size() // self.rollout_tp

    @property
    def streams(self) -> bool:
        """generate's on_finish sees each response as it finishes: with LLM.enqueue (vLLM 0.32
        has it; an older vLLM scores whole batches)."""
        return hasattr(self.llm, "enqueue")

    def generate(self, prompts, n, params: SamplingParams, on_finish=None):
        from vllm import SamplingParams as VSP

        from megatron_less.rollout.vllm_logprobs import KEY

        if not self._weights_current:
            raise RuntimeError("the rollout engine slept at level 2, which discards its weights: "
                               "sync_weights must come before generate")
        replica, replicas = self._replica()
        requests = [(i, j) for i in range(len(prompts)) for j in range(n)][replica::replicas]
        inputs = [{"prompt_token_ids": list(prompts[i])} for i, _ in requests]
        sps = [
            VSP(
                n=1,
                # the temperature is applied by TemperedLogProbs, so vLLM samples at 1 (0: greedy)
                temperature=1.0 if params.temperature > 0 else 0.0,
                extra_args={KEY: params.temperature},
                top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else 0,
                max_tokens=params.max_tokens,
                seed=params.request_seed(i, j),
                stop_token_ids=list(params.stop_token_ids),
                logprobs=0,
                detokenize=False,
                ignore_eos=not params.stop_token_ids,
            )
            for i, j in requests
        ]
        done = {}

        def finished(i, j, out):
            c = out.outputs[0]
            lps = [float(d[t].logprob) for t, d in zip(c.token_ids, c.logprobs)]
            done[(i, j)] = Response(list(c.token_ids), lps, "stop" if c.finish_reason == "stop" else "length")
            if on_finish is not None and self._replica_leader():
                on_finish(i, j, done[(i, j)])

        if on_finish is None:
            for (i, j), out in zip(requests, self.llm.generate(inputs, sps, use_tqdm=False) if inputs else []):
                finished(i, j, out)
        elif inputs:  # LLM.generate's own loop (enqueue, then step the engine), seeing each finish
            where = {}
            for k, rid in enumerate(self.llm.enqueue(inputs, sps, use_tqdm=False)):
                # outputs carry the id enqueue made; vLLM 0.32 returns it with a random suffix
                where[rid] = where[rid.rsplit("-", 1)[0]] = k
            while self.llm.llm_engine.has_unfinished_requests():
                for out in self.llm.llm_engine.step():
                    if out.finished:
                        finished(*requests[where[out.request_id]], out)
        if replicas > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, done)
            done = {k: v for part in parts for k, v in part.items()}
        return [[done[(i, j)] for j in range(n)] for i in range(len(prompts))]

    # -- weights ------------------------------------------------------------------------------
    def _buckets(self, model, counts: dict):
        """Every full HF tensor, gathered a bucket at a time (at least ``bucket_bytes``, closed
        only between layers), in model order."""
        bucket, size, cur_layer = [], 0, None
        for name, tensor in iter_all_hf_tensors(model, self.arch):
            layer = _layer_of(name)
            if bucket and layer != cur_layer and size >= self.bucket_bytes:
                counts["buckets"] += 1
                yield from bucket
                bucket, size = [], 0
            cur_layer = layer
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            counts["bytes"] += tensor.numel() * tensor.element_size()
        if bucket:
            counts["buckets"] += 1
            yield from bucket

    def _load(self, weights) -> None:
        """One in-place reload of ``weights`` (HF names, full tensors; any iterable, consumed
        while vLLM loads). It must cover every module: vLLM would keep the old (after a level-2
        sleep: undefined) tensors of a module it did not receive and only log it, so that is
        raised here instead. Its notes about modules without checkpoint weights of their own -
        the rotary tables and a tied LM head - are dropped."""
        expected = {"RotaryEmbedding"} | ({"ParallelLMHead"} if self.arch.tie_word_embeddings else set())
        with _unloaded_modules(expected) as unloaded:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        if unloaded:
            raise RuntimeError(f"the weight sync left vLLM modules without new weights: {unloaded}")

    def sync_weights(self, model) -> dict:
        """Stream every layer's full HF tensors from the Megatron shards into vLLM (collective);
        wakes a sleeping engine in stages: weights, the new weights, then the KV cache."""
        t0 = time.perf_counter()
        counts = {"bytes": 0, "buckets": 0}
        self.load_weights(self._buckets(model, counts))
        return {"seconds": time.perf_counter() - t0, **counts}

    def load_weights(self, weights) -> None:
        """Load every weight from ``weights`` ((HF name, full tensor) pairs, consumed while vLLM
        loads; placement separate: received over the bridge) - the same staged wake-up."""
        self.wake_up(("weights",))  # memory back, contents undefined after a level-2 sleep
        self._load(weights)
        if self.arch.tie_word_embeddings:
            self.llm.collective_rpc(_repack_tied_lm_head)
        self._weights_current = True
        self.wake_up(("kv_cache",))  # only now: it does not compete with the sync's tensors
        # cached prompt blocks hold activations of the old weights
        self.llm.reset_prefix_cache()

    def shutdown(self) -> None:
        """Release the engine and vLLM's process groups while torch.distributed is still up
        (vLLM's exit hook otherwise tries to destroy groups the trainer already tore down)."""
        from vllm.distributed.parallel_state import destroy_model_parallel

        if getattr(self, "llm", None) is not None:
            del self.llm
            self.llm = None
            destroy_model_parallel()

    def sleep(self) -> None:
        """Free the weights' and KV cache's memory (GPU with sleep mode; else a no-op). Level 2:
        the weights are discarded, not copied to host, so the next sync must rewrite them."""
        if self.sleep_mode and not self._sleeping:
            self.llm.sleep(level=2)
            self._sleeping = {"weights", "kv_cache"}
            self._weights_current = False

    def wake_up(self, tags=("weights", "kv_cache")) -> None:
        """Reallocate what ``tags`` name of a sleeping engine. After a level-2 sleep the weights
        are undefined until ``sync_weights``, which wakes the engine itself and should be
        preferred: it wakes the KV cache only after the weights are in."""
        tags = [t for t in tags if t in self._sleeping]
        if tags:
            if torch.cuda.is_available():
                # training's activations stay cached in torch's allocator; vLLM's weights and KV
                # cache come from its own memory pool, which cannot use that cache
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=tags)
            self._sleeping -= set(tags)


@contextlib.contextmanager
def _unloaded_modules(expected: set[str]):
    """Collects what vLLM's in-place reload reports as not loaded ("<Module>: Failed to load
    weights", "Following weights were not loaded from checkpoint: ..."), scoped to one reload:
    those records are kept from vLLM's log (the caller raises on them) and the ``expected``
    module kinds are dropped. Their loggers are opened to warnings for the duration, so a
    quieter VLLM_LOGGING_LEVEL cannot hide a missing weight."""
    from vllm.model_executor.model_loader.reload import inplace, layerwise

    found: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        if record.msg == "%s: Failed to load weights":
            if record.args and record.args[0] not in expected:
                found.append(record.getMessage())
            return False
        if "were not loaded from checkpoint" in str(record.msg):
            found.append(record.getMessage())
            return False
        return True

    loggers = [layerwise.logger, inplace.logger]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addFilter(keep)
        if lg.getEffectiveLevel() > logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        yield found
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeFilter(keep)
            lg.setLevel(level)


def _repack_tied_lm_head(worker) -> bool:
    """vLLM's CPU kernels pack the LM head's weight at load time. A tied head loads nothing of
    its own on reload, so it would keep sampling from the old, packed embedding: re-pack it
    from the freshly loaded shared weight (a no-op for unquantized weights on GPU)."""
    model = worker.model_runner.model
    head = getattr(model, "lm_head", None)
    if head is None or head.weight is not model.model.embed_tokens.weight:
        return False
    head.quant_method.process_weights_after_loading(head)
    return True


def _layer_of(hf_name: str) -> int | None:
    if hf_name.startswith("model.layers."):
        return int(hf_name.split(".")[2])
    return None

