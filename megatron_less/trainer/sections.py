"""The training config's sections: one typed class per YAML section (pydantic), their defaults,
ranges and the descriptions docs/config.md shows (``trainer.config_doc``), and the checks that
span sections. Loading, overrides and the checks that need the model: ``trainer.config``."""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


def did_you_mean(name: str, valid) -> str:
    match = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(_Section):
    hf_dir: str | None = None  # an HF Qwen2/Qwen2.5 folder to start from
    checkpoint: str | None = None  # or a megatron-less checkpoint (convert-hf output)
    tokenizer: str | None = None  # default: hf_dir
    # bf16: bf16 weights, fp32 main weights in megatron's mixed-precision optimizer (CPU too)
    dtype: Literal["fp32", "bf16"] = "fp32"
    # speed and memory knobs; each description says what it trades
    fused_lm_head: bool = Field(True, description=(
        "LM head + log-prob/entropy in logits tiles, recomputed in backward (ops.lm_head): saves the "
        "[tokens, vocab/TP] logits and their gradient (2 x 10 GB fp32 at 16k x 152k) for one extra "
        "LM-head matmul in backward; false: materialise the logits"))
    attention: Literal["auto", "sdpa", "local"] = Field("auto", description=(
        "core attention: sdpa (torch scaled_dot_product_attention, no [heads, s, s] score matrix), "
        "local (megatron's unfused DotProductAttention: stores scores and probabilities per layer), "
        "auto (TransformerEngine when importable, else sdpa); same parameters either way"))
    recompute_granularity: Literal["none", "selective", "full"] = Field("none", description=(
        "activation recomputation: selective re-runs core attention in backward (small compute, frees "
        "what attention keeps: much with attention local, little with sdpa); full keeps only each "
        "recomputed layer's input and re-runs the layer (~1 extra forward, ~1/3 more step time)"))
    recompute_method: Literal["uniform", "block"] = Field("uniform", description=(
        "full recompute only: uniform checkpoints every group of recompute_num_layers layers; block "
        "recomputes only the first recompute_num_layers layers of each stage (less compute, less saved)"))
    recompute_num_layers: int = Field(1, ge=1, description="full recompute only: see recompute_method")

    def megatron_overrides(self) -> dict[str, Any]:
        """The recompute settings as megatron TransformerConfig fields."""
        if self.recompute_granularity == "none":
            return {}
        if self.recompute_granularity == "selective":
            return {"recompute_granularity": "selective"}
        return {"recompute_granularity": "full", "recompute_method": self.recompute_method,
                "recompute_num_layers": self.recompute_num_layers}

    @model_validator(mode="after")
    def _one_source(self):
        if (self.hf_dir is None) == (self.checkpoint is None):
            raise ValueError("set exactly one of model.hf_dir and model.checkpoint")
        if self.checkpoint is not None and self.tokenizer is None:
            raise ValueError("model.tokenizer is required with model.checkpoint (a checkpoint holds no tokenizer)")
        return self


class ParallelCfg(_Section):
    tp: int = Field(1, ge=1)  # tensor-parallel size (divides heads, KV heads and the FFN width)
    pp: int = Field(1, ge=1)  # pipeline stages (divides the layers); data-parallel size = world / (tp x pp)
    sequence_parallel: bool | None = Field(None, description=(
        "split the activations outside attention and MLP (norms, residuals, dropout) over the TP group along "
        "the sequence: activation memory per layer sbh(10 + 24/tp) -> sbh(34/tp), the TP all-reduces become "
        "all-gather + reduce-scatter of the same volume; micro-batches are padded to a multiple of tp. "
        "None: on when tp > 1 (as verl and Megatron-LM's scripts do); no effect at tp 1"))

    @property
    def uses_sequence_parallel(self) -> bool:
        """sequence_parallel with its default resolved: on at tp > 1 unless set false."""
        return self.tp > 1 and self.sequence_parallel is not False


class DataCfg(_Section):
    train_file: str  # JSON Lines with prompt / answer (megatron-less prepare-data writes it)
    template: Literal["none", "qwen_math", "plain"] = "none"  # applied to rows written with "none"
    max_prompt_tokens: int = Field(1024, ge=1)  # longer prompts are skipped and counted
    # false: a bad row stops the run naming file and line; true: skipped and counted
    skip_bad_rows: bool = False
    shuffle: bool = True  # a seeded permutation per epoch (resumable); false: file order


class RolloutCfg(_Section):
    engine: Literal["auto", "vllm", "builtin"] = "auto"  # auto: vLLM when installed
    n: int = Field(8, ge=1)  # responses per prompt
    temperature: float = Field(1.0, gt=0)  # sampling temperature; log-probs and entropies are taken at it too
    top_p: float = Field(1.0, gt=0, le=1)  # nucleus sampling (1: off)
    top_k: int = Field(-1, ge=-1)  # -1: off
    # response length cap; longer responses are cut (finish_reason length)
    max_tokens: int = Field(3072, ge=1)
    rollout_tp: int = Field(1, ge=1)  # vLLM tensor-parallel size (divides the world size)
    # vLLM KV cache size; None: vLLM's own sizing from gpu_memory_utilization
    kv_cache_gib: float | None = Field(None, gt=0)
    # vLLM's share of GPU memory (its start-up checks free memory)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description=(
        "the rollout engine's weights and kernels (auto: model.dtype); bf16 rollouts beside an fp32 trainer "
        "are the usual setting at scale, and the source of the rollout/trainer mismatch the mismatch/* "
        "metrics measure and algo.correction corrects"))
    placement: Literal["colocated", "separate"] = Field("colocated", description=(
        "colocated: every rank generates, then every rank trains (vLLM sleeps through training on GPU); "
        "separate: the last rollout.ranks ranks of the job only generate (vLLM, rollout_tp within them) while "
        "the others train, generation running ahead of training by up to rollout.max_staleness steps"))
    ranks: int = Field(1, ge=1)  # placement separate: how many of the job's ranks generate (the last ones)
    max_staleness: int = Field(1, ge=0, description=(
        "placement separate: the batch of step k is generated with the weights of step k-1-max_staleness or "
        "newer (1: generation of step k+1 overlaps training step k; 0: synchronous, the colocated algorithm "
        "on separate ranks)"))
    bridge_timeout_s: float = Field(3600.0, gt=0, description=(
        "placement separate: how long a side waits for the other (a whole training step or rollout batch; "
        "torch.distributed's timeout of the bridge and of each side's groups)"))


class BatchCfg(_Section):
    prompts_per_step: int = Field(512, ge=1)  # one rollout batch
    mini_batch_prompts: int = Field(32, ge=1)  # prompts per optimizer step
    micro_batch_tokens: int = Field(16384, ge=1, description=(
        "token budget of one micro-batch (rows x longest row, padded): activation memory grows with it "
        "(model.recompute_* and parallel.sequence_parallel shrink them), fewer and larger micro-batches keep the "
        "GPU busier"))
    ppo_epochs: int = Field(1, ge=1)  # passes over each rollout batch (1: on-policy)
    packing: bool = Field(False, description=(
        "sequences back to back in one row of at most micro_batch_tokens tokens (first-fit decreasing), their "
        "boundaries given to attention (TE and sdpa: THD cu_seqlens, one causal kernel per sequence for sdpa; "
        "attention local: a [tokens, tokens] block-diagonal mask): no compute on padding and micro-batches of "
        "near-equal size; false: rows sorted by length, each padded to the longest of its micro-batch"))


class DynamicSamplingCfg(_Section):
    enable: bool = Field(False, description=(
        "DAPO dynamic sampling: groups whose responses all agree on `metric` (all right or all wrong) carry "
        "no GRPO advantage and are dropped; further prompt batches are generated until batch.prompts_per_step "
        "groups with signal are collected or max_rounds is reached (then the step trains on what there is, "
        "a multiple of the data-parallel size)"))
    metric: Literal["correct", "reward"] = Field("correct", description=(
        "what must vary inside a group for it to be kept: correct (the verdict, as DAPO's acc) or reward "
        "(after reward shaping, e.g. the overlong penalty)"))
    max_rounds: int = Field(3, ge=1, description=(
        "generation rounds per step at most, the first included (each draws batch.prompts_per_step prompts)"))


class AlgoCfg(_Section):
    advantage: str = "grpo"  # advantage estimator (registry: grpo, dr_grpo, rloo)
    advantage_kwargs: dict[str, Any] = {}  # its keyword arguments (e.g. eps)
    shaper: str = "less"  # advantage shaper: less (Low-Entropy Segment Shaping) or none
    # LESS: mu (min segment length), quantile (entropy threshold per response)
    shaper_kwargs: dict[str, Any] = {"mu": 5, "quantile": 0.8}
    policy_loss: str = "ppo_clip"  # ppo_clip, forking_tokens, clip_cov, kl_cov (registry)
    loss_kwargs: dict[str, Any] = {}  # its keyword arguments (ppo_clip: clip_low, clip_high, dual_clip_c)
    # how token losses are averaged (token-mean: over the whole optimizer step's tokens)
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = (
        "token-mean"
    )
    # KL penalty to the frozen reference model (0: no reference model is built)
    kl_coef: float = Field(0.0, ge=0)
    kl_type: Literal["k1", "k2", "k3", "low_var_kl"] = "k3"  # KL estimator
    entropy_coef: float = 0.0  # entropy bonus coefficient (0: none)
    correction: str = Field("none", description=(
        "rollout/trainer mismatch correction (registry; algos/rollout_correction.py): none, token_tis "
        "(truncated token IS), seq_tis, token_rs / seq_rs / geo_rs (rejection: mask tokens or sequences whose "
        "ratio pi_old / pi_rollout leaves [lower, threshold]), seq_mask_tis (geo_rs mask + token_tis)"))
    correction_kwargs: dict[str, Any] = Field({}, description="its keyword arguments (threshold, lower, ...)")
    old_logprobs: Literal["recompute", "rollout"] = Field("recompute", description=(
        "recompute: the trainer's forward pass gives pi_old (and the entropies LESS reads); rollout (bypass): "
        "the engine's log-probs are pi_old, the pass is skipped and PPO's ratio pi / pi_rollout absorbs the "
        "mismatch; needs algo.shaper none and algo.correction none"))
    overlong_filter: bool = Field(False, description=(
        "responses cut at rollout.max_tokens stay in their group's advantage but leave the loss (DAPO "
        "overlong filtering): no gradient from a truncated trace"))
    dynamic_sampling: DynamicSamplingCfg = DynamicSamplingCfg()

    @model_validator(mode="after")
    def _registered(self):
        from megatron_less.algos import list_registered

        for kind, field in (("advantage", "advantage"), ("shaper", "shaper"), ("policy_loss", "policy_loss"),
                            ("correction", "correction")):
            name, valid = getattr(self, field), list_registered(kind)
            if name not in valid:
                raise ValueError(f"algo.{field}: unknown {kind} {name!r}{did_you_mean(name, valid)}; valid: {valid}")
        return self


class OptimCfg(_Section):
    lr: float = Field(1e-6, gt=0)  # peak learning rate (Adam)
    min_lr: float = Field(0.0, ge=0)  # the schedule's floor (cosine, linear)
    # after warm-up: constant, cosine or linear decay to min_lr over train.steps
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)  # optimizer steps of linear warm-up
    weight_decay: float = Field(0.0, ge=0)  # decoupled (AdamW)
    adam_beta1: float = Field(0.9, ge=0, lt=1)  # Adam beta1
    adam_beta2: float = Field(0.999, ge=0, lt=1)  # Adam beta2
    adam_eps: float = Field(1e-8, gt=0)  # Adam epsilon
    clip_grad: float = Field(1.0, ge=0)  # global gradient-norm clip (0: off)
    # shard optimizer state (fp32 main weights, Adam moments) over data-parallel ranks; its
    # checkpoints reload at the same TP/PP only (any DP size)
    use_distributed_optimizer: bool = False


class RewardCfg(_Section):
    timeout_s: float = Field(5.0, gt=0)  # CPU seconds per response; a timeout scores 0
    workers: int | None = Field(None, ge=1)  # reward processes per rank (None: one per core, at most 8)
    overlong_buffer: int = Field(0, ge=0, description=(
        "DAPO soft overlong penalty: a response longer than rollout.max_tokens - overlong_buffer loses "
        "overlong_penalty x (its excess / overlong_buffer) of reward, up to overlong_penalty at the cap "
        "(0: off); applied before advantages, the verdict (correct) unchanged"))
    overlong_penalty: float = Field(1.0, ge=0, description="the overlong penalty at rollout.max_tokens")


class TrainCfg(_Section):
    steps: int = Field(100, ge=1)  # rollout steps (each: generate, score, 1+ optimizer steps)
    # end this job after so many steps (checkpointing first), e.g. to fit a scheduler's time
    # limit; the next job with checkpoint.resume=auto goes on from there
    stop_after_steps: int | None = Field(None, ge=1)


class EvalCfg(_Section):
    every: int = Field(0, ge=0)  # 0: never during training; else every k steps and at the last step
    before_train: bool = False  # also evaluate the starting policy (logged as step 0): the run's own baseline
    benchmarks: list[str] = ["math500"]  # registry names (math500, aime24, ...), local files or hub ids
    n: int = Field(4, ge=1)  # samples per problem (avg@n, pass@k, worst@k, maj@n)
    temperature: float = Field(0.1, ge=0)  # sampling temperature of evaluation
    top_p: float = Field(1.0, gt=0, le=1)  # nucleus sampling of evaluation
    max_tokens: int = Field(1024, ge=1)  # response length cap of evaluation
    limit: int | None = Field(None, ge=1)  # problems per benchmark
    # prompt template (none: the file's prompts as they are)
    template: Literal["none", "qwen_math", "plain"] = "qwen_math"


class CheckpointCfg(_Section):
    every: int = Field(0, ge=0)  # 0: only at the end
    keep: int = Field(3, ge=1)  # newest complete checkpoints kept
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir), none, or a folder
    export_hf: bool = False  # write an HF folder at the end (output_dir/hf)
    # with resume none: delete an earlier run's checkpoints, hf/ and logs in output_dir, then start over
    overwrite: bool = False


class LogCfg(_Section):
    tensorboard: bool = True  # scalars to output_dir/tensorboard (metrics.jsonl is always written)
    rollouts_per_step: int = Field(4, ge=0)  # responses saved to rollouts.jsonl each step
    progress: bool = True  # a tqdm progress bar on rank 0


class Config(_Section):
    seed: int = 1  # seeds the prompt order, sampling, reward pool and model init: one seed, one run
    output_dir: str = "runs/default"  # logs, checkpoints, eval reports (created; resume: auto looks here)
    model: ModelCfg
    parallel: ParallelCfg = ParallelCfg()
    data: DataCfg
    rollout: RolloutCfg = RolloutCfg()
    batch: BatchCfg = BatchCfg()
    algo: AlgoCfg = AlgoCfg()
    optim: OptimCfg = OptimCfg()
    reward: RewardCfg = RewardCfg()
    train: TrainCfg = TrainCfg()
    eval: EvalCfg = EvalCfg()
    checkpoint: CheckpointCfg = CheckpointCfg()
    log: LogCfg = LogCfg()

    @model_validator(mode="after")
    def _batches(self):
        b = self.batch
        if b.prompts_per_step % b.mini_batch_prompts:
            raise ValueError(
                f"batch.prompts_per_step ({b.prompts_per_step}) must be a multiple of "
                f"batch.mini_batch_prompts ({b.mini_batch_prompts})"
            )
        if self.optim.min_lr > self.optim.lr:
            raise ValueError(f"optim.min_lr ({self.optim.min_lr}) exceeds optim.lr ({self.optim.lr})")
        if self.reward.overlong_buffer > self.rollout.max_tokens:
            raise ValueError(f"reward.overlong_buffer ({self.reward.overlong_buffer}) exceeds rollout.max_tokens "
                             f"({self.rollout.max_tokens})")
        a, r = self.algo, self.rollout
        if r.placement == "separate":
            if r.engine == "builtin":
                raise ValueError("rollout.placement: separate needs rollout.engine vllm (the built-in sampler runs "
                                 "the trainer's own Megatron model, which rollout ranks do not hold)")
            if r.max_staleness and a.old_logprobs == "recompute" and a.correction == "none":
                raise ValueError(
                    f"rollout.max_staleness {r.max_staleness} trains on responses sampled by a policy up to "
                    f"{r.max_staleness} step(s) old, which the PPO ratio alone does not correct: set algo.correction "
                    "(token_tis: decoupled PPO, recomputed pi_old as the proximal policy, truncated IS to the "
                    "rollout's log-probs), algo.old_logprobs=rollout (PPO against the behaviour policy), or "
                    "rollout.max_staleness=0")
        if a.old_logprobs == "rollout":
            if a.shaper != "none":
                raise ValueError(f"algo.old_logprobs: rollout (bypass) skips the trainer's forward pass, whose "
                                 f"per-token entropies shaper {a.shaper!r} reads; set algo.shaper=none or "
                                 f"algo.old_logprobs=recompute")
            if a.correction != "none":
                raise ValueError(f"algo.old_logprobs: rollout (bypass) takes pi_old = pi_rollout, so correction "
                                 f"{a.correction!r} would have no mismatch to correct; set algo.correction=none")
        return self
