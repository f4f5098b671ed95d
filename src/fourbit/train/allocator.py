"""glibc's malloc told to keep what a training step frees, for the next step to reuse.

A CPU training step allocates and frees the same activations, a few hundred MiB, every step.
glibc serves a large block (past M_MMAP_THRESHOLD: 128 KiB, rising with use to at most 32 MiB)
with a fresh mmap, and gives the heap's free top back to the system (past M_TRIM_THRESHOLD), so
each step's blocks come back as fresh pages that the kernel zeroes on first touch: about 75,000
page faults a step of bench/bench_train_step.py (SmolLM2-135M, 4 x 128 tokens), 0.1-0.4 s of
system time. With both thresholds raised the blocks stay in the heap and are reused (about 100
faults a step). Resident memory then stays at its high-water mark between steps (the peak, which
is what a run must have anyway). Process-wide, so ``fourbit train`` asks for it (it owns its
process); a program that calls the training API may call it too.
"""

from __future__ import annotations

import ctypes
import platform
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # the largest glibc takes on 64-bit: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 1 << 30  # free heap top kept up to 1 GiB (a step's activations, many times over)


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process. Returns whether it did: False off
    Linux/glibc (musl, macOS, Windows keep their allocator's defaults)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
