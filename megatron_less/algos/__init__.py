"""Advantage estimators, advantage shapers and policy losses as pure tensor functions.

No torch.distributed or Megatron imports here: the trainer passes global normalisers in.
Importing this package registers every built-in algorithm (see registry.py).
"""

# imported for registration
from . import advantages, entropy_baselines, less, losses, reward_shaping, rollout_correction  # noqa: F401
from .advantages import compute_token_advantages, group_has_signal
from .registry import (
    get_advantage,
    get_correction,
    get_policy_loss,
    get_shaper,
    list_registered,
    register_advantage,
    register_correction,
    register_policy_loss,
    register_shaper,
)
from .reward_shaping import check_overlong, overlong_penalty
from .rollout_correction import Correction, apply_correction, mismatch_stats, summarize_mismatch

__all__ = [
    "Correction",
    "apply_correction",
    "check_overlong",
    "compute_token_advantages",
    "get_advantage",
    "get_correction",
    "get_policy_loss",
    "get_shaper",
    "group_has_signal",
    "list_registered",
    "mismatch_stats",
    "overlong_penalty",
    "register_advantage",
    "register_correction",
    "register_policy_loss",
    "register_shaper",
    "summarize_mismatch",
]
