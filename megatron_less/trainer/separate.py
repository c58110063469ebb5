"""rollout.placement: separate - both ends of the bridge (parallel/placement.py), in lockstep.

The rollout ranks run `serve`: they draw the prompts, generate and score each step's batch with
phases.collect (dynamic sampling included), and run up to ``max_staleness`` batches ahead of the
trainers. The trainer ranks hold a `RemoteRollout` as their engine: phases.collect takes its
batches, phases.sync_weights sends it the weights, phases.evaluate asks it for the figures.

The bridge carries one fixed sequence of messages; both sides know it from the config alone:

    hello (trainer: start step, data position, batches already ahead), weights v_start, slot end
    for every step k:  batch k (rollout) | ready (rollout) | weights v_k (trainer) | slot end (rollout)

Batch k is generated with weight version max(start, k - 1 - max_staleness) and records it. A slot
end carries the step's evaluation figures (the rollout ranks evaluate: they hold the engine) and,
at a checkpoint step, every batch already generated for later steps: those were sampled from
weights no checkpoint keeps, so the checkpoint saves them (`checkpoint_state`) and a resume sends
them back in its hello - the resumed run trains on exactly the batches the uninterrupted one does.
"""

from __future__ import annotations

import time
from collections import deque
from itertools import takewhile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_less.checkpoints import train_state
from megatron_less.parallel.gather import iter_all_hf_tensors
from megatron_less.parallel.placement import Bridge
from megatron_less.rollout.base import RolloutEngine
from megatron_less.trainer import phases
from megatron_less.trainer.batch import Sequence

BUCKET_BYTES = 512 << 20  # the colocated sync's bucket size (vllm_engine.VLLMEngine)


# --- the rollout ranks --------------------------------------------------------------------------


@dataclass
class RolloutSide:
    """What a rollout rank holds: what phases.collect and phases.evaluate read of a run."""

    cfg: Any
    engine: Any
    tokenizer: Any
    stop_ids: tuple[int, ...]
    sampler: Any
    dp: int  # the trainers' data-parallel size (dynamic sampling keeps a multiple of it)
    bridge: Bridge
    metrics: dict = field(default_factory=dict)  # what train() returns for the CLI: nothing here

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output_dir)


def build_side(cfg) -> RolloutSide:
    """A rollout rank's part of a run: the same checks and prompts as the trainers', its side's
    process group and the bridge, the vLLM engine (weights arrive in serve's hello)."""
    from megatron_less.data.sampler import PromptSampler, load_prompts
    from megatron_less.data.tokenizer import load_tokenizer, stop_token_ids
    from megatron_less.parallel import placement
    from megatron_less.trainer.config import check_layout
    from megatron_less.trainer.setup import model_arch, vllm_engine

    arch = model_arch(cfg)
    place = placement.of_env(cfg.rollout.ranks)
    dp = check_layout(cfg, arch, place.world)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.hf_dir)
    prompts, _ = load_prompts(cfg.data.train_file, tokenizer, template=cfg.data.template,
                              max_prompt_tokens=cfg.data.max_prompt_tokens, skip_bad=cfg.data.skip_bad_rows)
    bridge = placement.split(place, cfg.rollout.bridge_timeout_s)  # every rollout rank is on the bridge
    # nothing else shares these GPUs: vLLM never sleeps there
    return RolloutSide(cfg=cfg, engine=vllm_engine(cfg, arch, sleep=False), tokenizer=tokenizer,
                       stop_ids=stop_token_ids(tokenizer, cfg.model.hf_dir or cfg.model.tokenizer),
                       sampler=PromptSampler(prompts, cfg.seed, cfg.data.shuffle), dp=dp, bridge=bridge)


def serve(side: RolloutSide) -> RolloutSide:
    """The rollout ranks' loop (every rollout rank; the first one speaks for them on the bridge)."""
    b, cfg = side.bridge, side.cfg
    lead = b.rank == Bridge.LEADER
    hello = b.objects(None, Bridge.TRAINER)
    start, last, s = hello["step"], hello["last"], cfg.rollout.max_staleness
    # a checkpoint's batches generated ahead, as far as they keep this run's bound (a resume with a
    # smaller max_staleness draws the rest again from the data position after the last one kept)
    ahead = deque(takewhile(lambda x: x["version"] >= x["step"] - 1 - s, hello["ahead"]))
    side.sampler.load_state_dict(ahead[-1]["sampler"] if ahead else hello["sampler"])
    version, idle = start, _load(side)
    figures = phases.evaluate(side, 0) if start == 0 and phases.eval_due(cfg, 0) else None
    b.objects({"step": start, "eval": figures, "ahead": None, "idle": idle} if lead else None, Bridge.LEADER)
    next_step = start + 1 + len(ahead)
    for k in range(start + 1, last + 1):
        if not ahead:
            ahead.append(_generate(side, next_step, version))
            next_step += 1
        batch = ahead.popleft()  # every rollout rank holds the same batches
        b.objects(batch if lead else None, Bridge.LEADER)
        # run ahead while the trainers train on batch k: batch k + s may use the weights of step
        # k - 1 (these); never past train.steps, so a stop_after_steps checkpoint keeps a full queue
        while next_step <= min(k + s, cfg.train.steps):
            ahead.append(_generate(side, next_step, version))
            next_step += 1
        idle = _load(side, ready=True)
        version = k
        figures = phases.evaluate(side, k) if phases.eval_due(cfg, k) else None  # collective over the rollout ranks
        keep = list(ahead) if train_state.due(cfg, k, last) else None
        b.objects({"step": k, "eval": figures, "ahead": keep, "idle": idle} if lead else None, Bridge.LEADER)
    side.engine.shutdown()
    b.close()
    return side


def _generate(side: RolloutSide, step: int, version: int) -> dict:
    """Batch ``step``: prompts drawn, responses generated and scored (collective over the rollout
    ranks), as plain data - it crosses the bridge and may be saved in a checkpoint."""
    t = phases.Timer()
    prompts, seqs, info = phases.collect(side, step, t)
    return {
        "step": step, "version": version, "prompts": [p.index for p in prompts],
        "seqs": [asdict(x) for x in seqs], "generated": [asdict(x) for x in info.pop("generated")], "info": info,
        "sampler": side.sampler.state_dict(),  # the data position after this batch
        "timeline": {"generate_s": t.get("rollout", 0.0), "reward_s": t.get("reward", 0.0)},
    }  # fmt: skip


def _load(side: RolloutSide, ready: bool = False) -> dict:
    """Receive and load one weight version (after telling the trainers the rollout ranks are
    between batches: ``ready``); how long they sat idle waiting for it."""
    t0, first = time.perf_counter(), []
    if ready:
        side.bridge.objects("ready" if side.bridge.rank == Bridge.LEADER else None, Bridge.LEADER)

    def stream():
        for i, item in enumerate(side.bridge.recv_tensors()):
            if not i:
                first.append(time.perf_counter())
            yield item

    side.engine.load_weights(stream())
    t1 = time.perf_counter()
    return {"rollout_wait_s": (first[0] if first else t1) - t0, "weights_load_s": t1 - (first[0] if first else t1)}


# --- the trainer ranks ----------------------------------------------------------------------------


class RemoteRollout(RolloutEngine):
    """The trainer ranks' engine under placement separate: no model here. Batches arrive on
    trainer rank 0 and are shared with the trainer ranks; weights leave from rank 0."""

    def __init__(self, cfg, arch, bridge: Bridge | None, prompts: list, ahead: list[dict]):
        self.cfg, self.arch, self.bridge = cfg, arch, bridge
        self.by_index = {p.index: p for p in prompts}
        self.ahead = ahead  # batches generated for steps after the last synced one (checkpointed)
        self.version = None
        self._slot: dict = {}

    def start(self, run) -> None:
        """Hello and the first weights (collective over the trainer ranks)."""
        if self.bridge is not None:
            hello = {"step": run.step, "last": run.last_step, "sampler": run.sampler.state_dict(), "ahead": self.ahead}
            self.bridge.objects(hello, Bridge.TRAINER)
        self.ahead = []
        self.version = run.step
        self._send(run.policy.module)

    def collect(self, run, step: int, timer) -> tuple[list, list[Sequence], dict]:
        """Batch ``step`` (collective over the trainer ranks), as phases.collect returns it."""
        with timer("rollout_wait"):
            batch = self._share(self.bridge.objects(None, Bridge.LEADER) if self.bridge else None)
        if batch["step"] != step:
            raise RuntimeError(f"placement separate: the rollout ranks sent the batch of step {batch['step']} "
                               f"for step {step} (the two sides' schedules differ)")
        run.sampler.load_state_dict(batch["sampler"])
        seqs = [Sequence(**x) for x in batch["seqs"]]
        info = dict(batch["info"], generated=[Sequence(**x) for x in batch["generated"]])
        gen = batch["timeline"]["generate_s"] + batch["timeline"]["reward_s"]
        info["timeline"] = {
            "weight_version": float(batch["version"]), "staleness": float(step - 1 - batch["version"]),
            "generate_s": batch["timeline"]["generate_s"], "reward_s": batch["timeline"]["reward_s"],
            "overlap": max(0.0, 1.0 - timer["rollout_wait"] / gen) if gen > 0 else 0.0,
        }  # fmt: skip
        return [self.by_index[i] for i in batch["prompts"]], seqs, info

    def sync_weights(self, model) -> dict:
        """Weights of the step just trained to the rollout ranks, once they are between batches."""
        t0 = time.perf_counter()
        # "ready" (the rollout ranks wait for weights) to every trainer rank: until it comes they
        # wait here, on the trainer world's gloo side with rollout.bridge_timeout_s, not inside
        # the gathers' NCCL groups with megatron's shorter timeout
        self._share(self.bridge.objects(None, Bridge.LEADER) if self.bridge else None)
        waited = time.perf_counter() - t0
        self.version += 1
        out = self._send(model)
        return {"trainer_wait_s": waited, **out}

    def _send(self, model) -> dict:
        t0 = time.perf_counter()
        tensors = iter_all_hf_tensors(model, self.arch)  # every trainer rank: TP/PP gathers
        counts = self.bridge.send_tensors(tensors, BUCKET_BYTES) if self.bridge else _drain(tensors)
        sent = time.perf_counter()
        self._slot = self._share(self.bridge.objects(None, Bridge.LEADER) if self.bridge else None)
        if self._slot["ahead"] is not None:
            self.ahead = self._slot["ahead"]
        return {"transfer_s": sent - t0, **counts, **self._slot["idle"]}

    def evaluation(self, step: int) -> dict:
        """The figures the rollout ranks computed at the end of ``step`` (rank 0 logs them)."""
        if self._slot.get("step") != step or self._slot.get("eval") is None:
            raise RuntimeError(f"placement separate: no evaluation from the rollout ranks for step {step}")
        return self._slot["eval"]

    def checkpoint_state(self) -> dict:
        return {"ahead": self.ahead}

    def shutdown(self) -> None:
        if self.bridge is not None:
            self.bridge.close()

    def generate(self, prompts, n, params, on_finish=None):
        raise RuntimeError("placement separate: trainer ranks hold no rollout engine (the rollout ranks generate)")

    @staticmethod
    def _share(obj):
        """Trainer rank 0's object to every trainer rank (collective over the trainer world)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _drain(tensors) -> dict:
    for _ in tensors:  # ranks other than 0 take part in the gathers, and send nothing
        pass
    return {}
