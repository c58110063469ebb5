"""vLLM colocated with the trainer, torchrun-style (SPMD).

Every rank of the job builds one in-process engine (``external_launcher``: vLLM joins the
existing torch.distributed world, consecutive ranks form a rollout-TP group). Rollout TP may
differ from training TP; rollout replicas (world / rollout TP) split the prompts and the results
are gathered back to every rank. Weights go from the Megatron shards to vLLM in memory, per layer,
in bounded buckets, through vLLM's in-place ``reload_weights`` — never through disk.
"""

from __future__ import annotations

import json
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
        if kv_cache_bytes and on_gpu:
            kw["kv_cache_memory_bytes"] = kv_cache_bytes
        self.llm = LLM(**kw)
        self._asleep = False

    # -- generation ---------------------------------------------------------------------------
    def _replica(self) -> tuple[int, int]:
        if not dist.is_initialized():
            return 0, 1
        return dist.get_rank() // self.rollout_tp, dist.get_world_size() // self.rollout_tp

    def generate(self, prompts, n, params: SamplingParams):
        from vllm import SamplingParams as VSP

        from megatron_less.rollout.vllm_logprobs import KEY

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
        outs = self.llm.generate(inputs, sps, use_tqdm=False) if inputs else []
        done = {}
        for (i, j), out in zip(requests, outs):
            c = out.outputs[0]
            lps = [float(d[t].logprob) for t, d in zip(c.token_ids, c.logprobs)]
            reason = "stop" if c.finish_reason == "stop" else "length"
            done[(i, j)] = Response(list(c.token_ids), lps, reason)
        if replicas > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, done)
            done = {k: v for part in parts for k, v in part.items()}
        return [[done[(i, j)] for j in range(n)] for i in range(len(prompts))]

    # -- weights ------------------------------------------------------------------------------
    def _push(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(bucket)})

    def sync_weights(self, model) -> dict:
        """Stream every layer's full HF tensors from the Megatron shards into vLLM."""
        t0 = time.perf_counter()
        nbytes, bucket, size, cur_layer = 0, [], 0, None
        for name, tensor in iter_all_hf_tensors(model, self.arch):
            layer = _layer_of(name)
            # flush only between layers: vLLM fuses q/k/v and gate/up of one layer on load
            if bucket and layer != cur_layer and size >= self.bucket_bytes:
                self._push(bucket)
                bucket, size = [], 0
            cur_layer = layer
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            nbytes += tensor.numel() * tensor.element_size()
        if bucket:
            self._push(bucket)
        if self.arch.tie_word_embeddings:
            self.llm.collective_rpc(_repack_tied_lm_head)
        # cached prompt blocks hold activations of the old weights
        self.llm.reset_prefix_cache()
        return {"seconds": time.perf_counter() - t0, "bytes": nbytes}

    def shutdown(self) -> None:
        """Release the engine and vLLM's process groups while torch.distributed is still up
        (vLLM's exit hook otherwise tries to destroy groups the trainer already tore down)."""
        from vllm.distributed.parallel_state import destroy_model_parallel

        if getattr(self, "llm", None) is not None:
            del self.llm
            self.llm = None
            destroy_model_parallel()

    def sleep(self) -> None:
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            # training's activations stay cached in torch's allocator; vLLM's weights and KV cache
            # come from its own memory pool, which cannot use that cache
            torch.cuda.empty_cache()
            self.llm.wake_up()
            self._asleep = False


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

