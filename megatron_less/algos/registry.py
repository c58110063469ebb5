"""Name -> function registries, so a config can say ``advantage: grpo, shaper: less``.

Adding an algorithm is one decorated function in one file (imported by ``algos/__init__``):

    @register_advantage("my_estimator")
    def my_estimator(rewards, group_index, **params): ...

Signatures each kind must follow:
  advantage(rewards [B], group_index [B], **params) -> advantages [B]
  shaper(advantages [B], batch: Mapping[str, Tensor], **params) -> (token_advantages [B, T], stats)
  policy_loss(log_prob, old_log_prob, advantages, response_mask, **params) -> (loss, metrics)
  correction(old_log_prob [B, T], rollout_log_prob [B, T], response_mask [B, T], **params) -> Correction

A config's ``*_kwargs`` become ``params``; `check_kwargs` tests them before any process starts:
each key must be a keyword of the function (one that takes ``**anything`` accepts any; a policy
loss's ``**common`` are `losses.finish_policy_loss`'s keywords, which the trainer sets itself), and
the values pass the ``check`` given at registration: the same function the algorithm runs on its
parameters, so the config and the algorithm agree. ``min_group_size`` (advantages): the fewest
responses per prompt that give the estimator any signal (2 for group-relative estimators).
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping

_REGISTRIES: dict[str, dict[str, Callable]] = {
    "advantage": {}, "shaper": {}, "policy_loss": {}, "correction": {}
}
_CHECKS: dict[tuple[str, str], Callable[..., None]] = {}
_MIN_GROUP: dict[str, int] = {}
# leading positional arguments (data) of each kind; the keywords after them are the parameters
_DATA_ARGS = {"advantage": 2, "shaper": 2, "policy_loss": 4, "correction": 3}


class KwargError(ValueError):
    """A bad algorithm keyword: ``key`` names it, ``reason`` says what is wrong."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


def _register(kind: str, name: str, check: Callable[..., None] | None = None,
              min_group_size: int | None = None) -> Callable[[Callable], Callable]:
    table = _REGISTRIES[kind]

    def deco(fn: Callable) -> Callable:
        if name in table and table[name] is not fn:
            raise ValueError(
                f"{kind} {name!r} is already registered (by {table[name].__module__}.{table[name].__qualname__})"
            )
        # only a registration that succeeds records anything (a refused one must not touch the original's)
        table[name] = fn
        if check is not None:
            _CHECKS[(kind, name)] = check
        if min_group_size is not None:
            _MIN_GROUP[name] = min_group_size
        return fn

    return deco


def _get(kind: str, name: str) -> Callable:
    table = _REGISTRIES[kind]
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}") from None


def register_advantage(name: str, *, check: Callable[..., None] | None = None, min_group_size: int = 1):
    return _register("advantage", name, check, min_group_size)


def register_shaper(name: str, *, check: Callable[..., None] | None = None):
    return _register("shaper", name, check)


def register_policy_loss(name: str, *, check: Callable[..., None] | None = None):
    return _register("policy_loss", name, check)


def register_correction(name: str, *, check: Callable[..., None] | None = None):
    return _register("correction", name, check)


def get_advantage(name: str) -> Callable:
    return _get("advantage", name)


def get_shaper(name: str) -> Callable:
    return _get("shaper", name)


def get_policy_loss(name: str) -> Callable:
    return _get("policy_loss", name)


def get_correction(name: str) -> Callable:
    return _get("correction", name)


def list_registered(kind: str) -> list[str]:
    return sorted(_REGISTRIES[kind])


def min_group_size(name: str) -> int:
    """The fewest responses per prompt that give advantage estimator ``name`` any signal."""
    _get("advantage", name)
    return _MIN_GROUP.get(name, 1)


def trainer_keywords(kind: str) -> tuple[str, ...]:
    """Keywords the trainer passes itself (a config's kwargs may not set them)."""
    if kind != "policy_loss":
        return ()
    from .losses import finish_policy_loss

    params = inspect.signature(finish_policy_loss).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)


def check_kwargs(kind: str, name: str, kwargs: Mapping) -> None:
    """``kwargs`` for registered ``kind`` ``name``: every key a keyword the function takes (not one
    the trainer sets), every value accepted by the function's registered check. Raises `KwargError`."""
    fn = _get(kind, name)
    reserved = trainer_keywords(kind)
    params = list(inspect.signature(fn).parameters.values())[_DATA_ARGS[kind]:]
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_ended = kind != "policy_loss" and any(p.kind is p.VAR_KEYWORD for p in params)
    valid = sorted(k for k in named if k not in reserved)
    for key in kwargs:
        if key in reserved:
            raise KwargError(key, "set by the trainer, not here")
        if key not in named and not open_ended:
            match = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {match[0]!r}?)" if match else ""
            raise KwargError(key, f"unknown keyword of {kind} {name!r}{hint}; valid: {', '.join(valid) or 'none'}")
    for key, p in named.items():
        if key in valid and p.default is p.empty and key not in kwargs:
            raise KwargError(key, f"required by {kind} {name!r}")
    check = _CHECKS.get((kind, name))
    if check is not None:
        defaults = {k: p.default for k, p in named.items() if k in valid and p.default is not p.empty}
        check(**{**defaults, **{k: v for k, v in kwargs.items() if k in named}})


# --- value checks the algorithms share (raise KwargError naming the keyword) ------------------


def check_number(key: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False, integer: bool = False, allow_none: bool = False) -> None:
    """``value`` is a finite number (an int when ``integer``; None when ``allow_none``) in the range."""
    if value is None and allow_none:
        return
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise KwargError(key, f"must be {'an integer' if integer else 'a number'} (got {value!r})")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if not (below or above):
        return
    if low is not None and high is not None:
        span = f"in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    elif low is not None:
        span = f"{'>' if low_open else '>='} {_num(low)}"
    else:
        span = f"{'<' if high_open else '<='} {_num(high)}"
    raise KwargError(key, f"must be {span}{' or null' if allow_none else ''} (got {value!r})")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
