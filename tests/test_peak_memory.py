"""The measured peak on a CPU: the process's high-water RSS, reset where training starts."""

import pytest
import torch

from fourbit.peak_memory import measured_peak, reset_peak

MIB = 2**20


def test_the_cpu_peak_sees_a_known_allocation_and_forgets_it_after_a_reset():
    if not reset_peak("cpu"):
        pytest.skip("/proc/self/clear_refs is not writable here: the peak cannot be reset")
    before = measured_peak("cpu").bytes
    block = torch.ones(256 * MIB // 4)  # 256 MiB, every page written (resident, not only reserved)
    del block
    # The freed block no longer counts towards RSS, but the high-water mark remembers it: at
    # least the 256 MiB above where it started (less 1 MiB for pages the allocator had already).
    assert measured_peak("cpu").bytes >= before + 255 * MIB
    assert reset_peak("cpu")
    assert measured_peak("cpu").bytes < before + 128 * MIB  # the mark came back to today's RSS


def test_the_peak_says_what_it_measured():
    reset_peak("cpu")
    assert "peak RSS of the process" in measured_peak("cpu").format()
    assert "since it started" in measured_peak("cpu", since_reset=False).what
    assert measured_peak("meta") is None
