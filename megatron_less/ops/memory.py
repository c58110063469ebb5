"""Peak memory of a CPU code region, two honest ways (tracemalloc cannot see torch).

``peak_tensor_bytes``: torch's allocator reports every allocation and free to the profiler
(``profile_memory=True``); replaying those events in time order gives the high-water mark of
tensor bytes allocated inside the region, including temporaries inside ops - the CPU analogue
of ``torch.cuda.max_memory_allocated``. ``peak_rss_bytes``: the kernel's resident-set
high-water mark (VmHWM, reset through /proc/self/clear_refs) minus RSS at the start; with
``fixed_mmap_threshold()`` every large buffer is its own mmap, so freed memory really leaves.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def peak_tensor_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """(peak bytes of tensors allocated while ``fn`` runs, above the start; ``fn``'s result)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, out


def fixed_mmap_threshold(nbytes: int = 1 << 17) -> bool:
    """Serve allocations >= nbytes by mmap and unmap them on free (glibc grows the threshold
    after the first large free otherwise, and freed buffers then stay resident)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, nbytes))  # M_MMAP_THRESHOLD
    except OSError:
        return False


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rss_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """(resident-set high-water mark while ``fn`` runs, above RSS at its start; result)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    start = _status_kb("VmRSS")
    out = fn()
    return (_status_kb("VmHWM") - start) * 1024, out

