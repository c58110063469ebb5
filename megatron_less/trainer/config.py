"""The training config: typed, nested (pydantic; the sections in ``trainer.sections``), read from
YAML with dotted overrides, validated before any process starts. Every error names the key
(``rollout.n``) and what is wrong with it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

# the sections are this module's API too (config_doc, tests and callers import them from here)
from megatron_less.trainer.sections import (  # noqa: F401
    did_you_mean,
    AlgoCfg,
    BatchCfg,
    CheckpointCfg,
    Config,
    DataCfg,
    DynamicSamplingCfg,
    EvalCfg,
    LogCfg,
    ModelCfg,
    OptimCfg,
    ParallelCfg,
    RewardCfg,
    RolloutCfg,
    TrainCfg,
)


class ConfigError(ValueError):
    """A bad config: the message names the key."""


# --- loading -----------------------------------------------------------------------------------


def _section_fields(path: tuple) -> list[str]:
    model: Any = Config
    for part in path:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if isinstance(p, str))
        key = ".".join(loc) or "config"
        if e["type"] == "extra_forbidden":
            valid = _section_fields(loc[:-1])
            lines.append(f"{key}: unknown key{did_you_mean(loc[-1], valid)}")
        elif e["type"] == "missing":
            lines.append(f"{key}: required")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, dict) or e["type"].startswith("value_error") else f" (got {got!r})"
            lines.append(f"{key}: {msg}{shown}")
    return "invalid config: " + lines[0] if len(lines) == 1 else "invalid config:\n  " + "\n  ".join(lines)


def apply_override(tree: dict, item: str) -> None:
    """``key.sub=value`` -> tree["key"]["sub"] = value, the value read as YAML (1e-6, true, [a, b])."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. rollout.n=8)")
    key, _, raw = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key part")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def build_config(tree: dict, *, check_paths: bool = True) -> Config:
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None
    check_algorithms(cfg)
    if check_paths:
        check_paths_exist(cfg)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), *, check_paths: bool = True) -> Config:
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    for item in overrides:
        apply_override(tree, item)
    return build_config(tree, check_paths=check_paths)


# the policy-loss keywords the trainer passes itself, and the config key each comes from
_TRAINER_KEYWORDS = {"loss_agg_mode": "algo.loss_agg_mode", "kl_coef": "algo.kl_coef", "kl_type": "algo.kl_type",
                     "entropy_coef": "algo.entropy_coef", "max_response_len": "rollout.max_tokens",
                     "rollout_is_weights": "algo.correction"}


def check_algorithms(cfg: Config) -> None:
    """The algorithms' keyword arguments against their signatures and their own value checks
    (algos.registry.check_kwargs), and a group size that gives the estimator a signal."""
    from megatron_less.algos.registry import KwargError, check_kwargs, min_group_size, trainer_keywords

    a = cfg.algo
    for kind, field, name, kwargs in (("advantage", "advantage_kwargs", a.advantage, a.advantage_kwargs),
                                      ("shaper", "shaper_kwargs", a.shaper, a.shaper_kwargs),
                                      ("policy_loss", "loss_kwargs", a.policy_loss, a.loss_kwargs),
                                      ("correction", "correction_kwargs", a.correction, a.correction_kwargs)):
        for key in kwargs:
            if key in trainer_keywords(kind):
                source = _TRAINER_KEYWORDS.get(key)
                raise ConfigError(f"invalid config: algo.{field}.{key}: set by the trainer"
                                  + (f" ({source})" if source else "") + ", not here")
        try:
            check_kwargs(kind, name, kwargs)
        except KwargError as e:
            raise ConfigError(f"invalid config: algo.{field}.{e.key}: {e.reason}") from None
    need = min_group_size(a.advantage)
    if cfg.rollout.n < need:
        raise ConfigError(
            f"invalid config: rollout.n: {cfg.rollout.n} response{'s' if cfg.rollout.n != 1 else ''} per prompt gives "
            f"advantage {a.advantage!r} no signal (each response is measured against the others of its prompt, "
            f"so every advantage would be 0); use rollout.n >= {need}"
        )


def check_paths_exist(cfg: Config) -> None:
    checks = [("data.train_file", cfg.data.train_file, "file"), ("model.hf_dir", cfg.model.hf_dir, "dir"),
              ("model.checkpoint", cfg.model.checkpoint, "dir"), ("model.tokenizer", cfg.model.tokenizer, "any")]
    for key, value, kind in checks:
        if value is None:
            continue
        p = Path(value)
        ok = p.is_file() if kind == "file" else p.is_dir() if kind == "dir" else p.exists() or "/" in value
        if not ok:
            raise ConfigError(f"{key}: {value} does not exist" + (" (expected a folder)" if kind == "dir" else ""))
    if cfg.checkpoint.resume not in ("auto", "none") and not Path(cfg.checkpoint.resume).is_dir():
        raise ConfigError(f"checkpoint.resume: {cfg.checkpoint.resume} is neither auto, none nor a folder")


def check_layout(cfg: Config, arch, world_size: int) -> int:
    """The checks that need the model and the world size; returns the data-parallel size."""
    from megatron_less.models import qwen2
    from megatron_less.models.qwen2 import ConfigError as ArchError

    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if cfg.batch.packing and cfg.model.dtype == "fp32" and cfg.model.attention == "auto" and qwen2.have_te():
        raise ConfigError("batch.packing with TransformerEngine's attention (model.attention: auto, TE importable) "
                          "needs model.dtype bf16 (its packed THD kernels are flash/cuDNN ones), or model.attention=sdpa")
    if cfg.rollout.placement == "separate":  # the last rollout.ranks ranks only generate
        r = cfg.rollout
        if not 0 < r.ranks < world_size:
            raise ConfigError(f"rollout.placement separate: rollout.ranks ({r.ranks}) must leave trainer ranks in the "
                              f"world of {world_size}")
        if r.ranks % r.rollout_tp:
            raise ConfigError(f"rollout.rollout_tp ({r.rollout_tp}) must divide rollout.ranks ({r.ranks})")
        world_size -= r.ranks
    elif world_size % cfg.rollout.rollout_tp:
        raise ConfigError(f"rollout.rollout_tp ({cfg.rollout.rollout_tp}) must divide the world size {world_size}")
    if world_size % (tp * pp):
        raise ConfigError(f"parallel: world size {world_size} is not a multiple of tp x pp = {tp} x {pp}")
    try:
        arch.check(tp, pp)
    except ArchError as e:
        raise ConfigError(f"parallel: {e}") from None
    dp = world_size // (tp * pp)
    if cfg.batch.mini_batch_prompts % dp:
        raise ConfigError(
            f"batch.mini_batch_prompts ({cfg.batch.mini_batch_prompts}) must be a multiple of the "
            f"data-parallel size {dp} (world {world_size} / tp {tp} / pp {pp}): all responses of a prompt "
            "stay on one data-parallel rank"
        )
    limit = arch.max_position_embeddings
    if cfg.data.max_prompt_tokens + cfg.rollout.max_tokens > limit:
        raise ConfigError(
            f"data.max_prompt_tokens + rollout.max_tokens = {cfg.data.max_prompt_tokens + cfg.rollout.max_tokens} "
            f"exceeds the model's max_position_embeddings {limit}"
        )
    return dp


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
