"""Advantage estimators, advantage shapers and policy losses as pure tensor functions.

No torch.distributed or Megatron imports here: the trainer passes global normalisers in.
Importing this package registers every built-in algorithm (see registry.py).
"""

from . import advantages, entropy_baselines, less, losses  # noqa: F401  (registration)
from .advantages import compute_token_advantages
from .registry import (
    get_advantage,
    get_policy_loss,
    get_shaper,
    list_registered,
    register_advantage,
    register_policy_loss,
    register_shaper,
)

__all__ = [
    "compute_token_advantages",
    "get_advantage",
    "get_policy_loss",
    "get_shaper",
    "list_registered",
    "register_advantage",
    "register_policy_loss",
    "register_shaper",
]
