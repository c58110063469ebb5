"""Name -> function registries, so a config can say ``advantage: grpo, shaper: less``.

Adding an algorithm is one decorated function in one file (imported by ``algos/__init__``):

    @register_advantage("my_estimator")
    def my_estimator(rewards, group_index, **params): ...

Signatures each kind must follow:
  advantage(rewards [B], group_index [B], **params) -> advantages [B]
  shaper(advantages [B], batch: Mapping[str, Tensor], **params) -> (token_advantages [B, T], stats)
  policy_loss(log_prob, old_log_prob, advantages, response_mask, **params) -> (loss, metrics)
"""

from __future__ import annotations

from collections.abc import Callable

_REGISTRIES: dict[str, dict[str, Callable]] = {"advantage": {}, "shaper": {}, "policy_loss": {}}


def _register(kind: str, name: str) -> Callable[[Callable], Callable]:
    table = _REGISTRIES[kind]

    def deco(fn: Callable) -> Callable:
        if name in table and table[name] is not fn:
            raise ValueError(
                f"{kind} {name!r} is already registered (by {table[name].__module__}.{table[name].__qualname__})"
            )
        table[name] = fn
        return fn

    return deco


def _get(kind: str, name: str) -> Callable:
    table = _REGISTRIES[kind]
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}") from None


def register_advantage(name: str):
    return _register("advantage", name)


def register_shaper(name: str):
    return _register("shaper", name)


def register_policy_loss(name: str):
    return _register("policy_loss", name)


def get_advantage(name: str) -> Callable:
    return _get("advantage", name)


def get_shaper(name: str) -> Callable:
    return _get("shaper", name)


def get_policy_loss(name: str) -> Callable:
    return _get("policy_loss", name)


def list_registered(kind: str) -> list[str]:
    return sorted(_REGISTRIES[kind])
