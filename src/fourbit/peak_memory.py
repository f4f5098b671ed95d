"""The measured peak memory of a stretch of work: on a GPU, torch's allocator peak; on a CPU,
the process's peak resident set (RSS).

    reset_peak(device)          start measuring here
    ...work...
    peak = measured_peak(device)

GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``: the tensors alive
at the worst moment (weights, activations, gradients, optimizer state), not the allocator's
cache nor the CUDA context.

CPU: torch keeps no count of CPU allocations, so the kernel's count is used: the high-water
mark of the process's resident memory, ``VmHWM`` in /proc/self/status. Writing "5" to
/proc/self/clear_refs resets that mark to the current RSS (Linux 4.0 and later), so the peak is
the stretch's, not the loading's. (``getrusage``'s ru_maxrss is not reset by it: it also keeps
the largest RSS the process had before, and at exec takes over its parent's.) It counts
everything the process holds: the tensors, and the Python, torch and transformers code and
buffers (a few hundred MiB that no estimate of tensors includes). Where the reset is not
allowed (a locked /proc), the peak is since the process started; without /proc (macOS),
ru_maxrss is read; :class:`Peak` says which.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Peak:
    bytes: int
    what: str  # how it was measured, for a reader of the number

    def format(self) -> str:
        return f"{self.bytes / 2**30:.2f} GiB ({self.what})"


def reset_peak(device: torch.device | str) -> bool:
    """Start a new peak here; False where the CPU peak cannot be reset (it then runs from process start)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return _reset_rss_high_water()


def measured_peak(device: torch.device | str, since_reset: bool = True) -> Peak | None:
    """The peak since :func:`reset_peak` (``since_reset`` is what it returned), or None where
    this device has no measure (neither CUDA nor a CPU with ``ru_maxrss``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return Peak(torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated")
    if device.type != "cpu":
        return None
    high_water = _status_kib("VmHWM")
    if high_water is None:  # no /proc: the process's peak since it started, whatever the reset said
        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
        return Peak(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit, "peak RSS of the process since it started")
    return Peak(high_water * 1024, "peak RSS of the process" + ("" if since_reset else " since it started"))


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, ...), or None without /proc."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), None)
    except OSError:
        return None


def _reset_rss_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
