"""megatron's distributed optimizer on torch's Adam (neither apex nor TE found): its
checkpoint code for that fallback, mended. torch's Adam keeps a ``step`` tensor per parameter
where apex/TE keep one per param group."""

from __future__ import annotations

import importlib

import torch

from megatron_less.parallel.mcore_compat.patch import Patch


def _distrib_state_dict_primed(method):
    """``DistributedOptimizer.state_dict`` asserts that every parameter's state holds one common
    ``step``; a fresh optimizer (a resume builds one, then asks for its sharded state to load into)
    has no state at all. Adam's state before its first update is zeros and step 0, exactly what
    torch's Adam would create itself, so that state is made first."""

    def wrapper(self, *args, **kwargs):
        inner = self.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state.get(p):
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}  # fmt: skip
        return method(self, *args, **kwargs)

    wrapper.__name__ = method.__name__
    return wrapper


def _distrib_load_state_dict_unshared(method):
    """``DistributedOptimizer.load_state_dict`` gives every parameter the *same* ``step`` tensor
    object (torch's Adam then increments it once per parameter at each update), and then
    overwrites it with the step of the loading template (the live optimizer's, 0 for a fresh
    one) instead of the checkpoint's, which it saved in each param group. Each parameter gets
    its own tensor holding the saved step. The load also copies into fp32 main parameters that
    are views of leaves needing grad (fp32 models), which autograd refuses outside no_grad."""

    def wrapper(self, state_dict, *args, **kwargs):
        with torch.no_grad():
            out = method(self, state_dict, *args, **kwargs)
        saved = {float(g["step"]) for g in state_dict["optimizer"]["param_groups"] if g.get("step") is not None}
        if len(saved) > 1:
            raise RuntimeError(f"optimizer checkpoint holds several Adam steps {sorted(saved)}; expected one")
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = torch.tensor(next(iter(saved)) if saved else float(state["step"]))
        return out

    wrapper.__name__ = method.__name__
    return wrapper


_DISTRIB = "megatron.core.optimizer.distrib_optimizer"
TORCH_ADAM_PATCHES: dict[str, Patch] = {
    p.name: p
    for p in [
        Patch(
            "distrib_state_dict_fresh",
            "DistributedOptimizer.state_dict asserts one common Adam step, and a fresh optimizer has none",
            {_DISTRIB: {"DistributedOptimizer.state_dict": _distrib_state_dict_primed}},
        ),
        Patch(
            "distrib_load_shared_step",
            "DistributedOptimizer.load_state_dict shares one step tensor among all parameters "
            "and copies into views of leaves needing grad",
            {_DISTRIB: {"DistributedOptimizer.load_state_dict": _distrib_load_state_dict_unshared}},
        ),
    ]
}


def torch_adam_fallback() -> bool:
    """Whether megatron's optimizers run on torch's Adam (neither apex nor TE found)."""
    return not importlib.import_module(_DISTRIB).HAVE_APEX_OR_TE
