"""The only place that patches megatron-core, and the seam between its versions (0.16.1, the
newest for Python 3.11, and the users' 0.19.2). One module per kind of fix:

- ``cpu`` (``PATCHES``): megatron-core assumes a GPU in a handful of spots:
  ``torch.cuda.current_device()`` as a device, ``torch.cuda.synchronize()`` / ``current_stream()``,
  CUDA RNG state get/set, ``device="cuda"`` literals, ``'torch.cuda.*Tensor'`` type strings and a
  ``weight.data.cuda()``. Every fix is scoped to the megatron module (or object) that needs it:
  mostly the module's global name ``torch`` is swapped for a thin proxy that answers those calls
  for the CPU and forwards everything else to the real ``torch``. torch itself is never touched
  (wrapping torch factory functions process-wide silently corrupted HF ``from_pretrained``).
  Applied only when CUDA is unavailable.
- ``torch_adam`` (``TORCH_ADAM_PATCHES``): without apex/TE megatron's optimizers run on torch's
  Adam, and the distributed optimizer's checkpoint code for that path is broken in 0.16 and 0.19
  alike. Applied wherever megatron found neither (CUDA or not).
- ``save`` (``sync_save``, all platforms): a synchronous torch_dist save without a
  multiprocessing Manager process, in which rank 0's own writes defer their errors until the
  collective part is over (else a full disk on rank 0 hangs the other ranks), and the shard
  writer's logged errors are kept for the message; scoped to the ``with`` block.

Each patch has a test in ``tests/test_cpu_compat.py`` that removes it and shows what breaks (or
what it costs), so a megatron-core upgrade that makes a patch unnecessary is noticed; the
deferred errors are shown by tests/test_reliability.py's full disk on rank 0.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from megatron_less.parallel.mcore_compat.cpu import PATCHES
from megatron_less.parallel.mcore_compat.patch import Patch
from megatron_less.parallel.mcore_compat.save import SaveIssues, sync_save
from megatron_less.parallel.mcore_compat.torch_adam import TORCH_ADAM_PATCHES, torch_adam_fallback

__all__ = ["PATCHES", "TORCH_ADAM_PATCHES", "Patch", "SaveIssues", "apply", "needed", "sync_save",
           "torch_adam_fallback", "without"]

_applied: set[str] = set()


def needed() -> bool:
    return not torch.cuda.is_available()


def apply() -> bool:
    """Apply the CPU patches once if CUDA is absent, and the torch-Adam ones once if megatron
    found neither apex nor TE. Returns whether the CPU patches are active."""
    wanted = ({**PATCHES} if needed() else {}) | (TORCH_ADAM_PATCHES if torch_adam_fallback() else {})
    for name, p in wanted.items():
        if name not in _applied:
            p.apply()
            _applied.add(name)
    return needed()


@contextlib.contextmanager
def without(name: str) -> Iterator[None]:
    """Temporarily remove one patch (tests use it to prove the patch is still needed)."""
    patch = {**PATCHES, **TORCH_ADAM_PATCHES}[name]
    patch.revert()
    try:
        yield
    finally:
        if name in _applied:
            patch.apply()
