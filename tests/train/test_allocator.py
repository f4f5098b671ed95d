"""keep_freed_memory: a block freed and allocated again is reused, not faulted in afresh. In a
subprocess each way, since the setting is process-wide and would change the rest of the suite's
memory figures.

Both subprocesses start with glibc's thresholds pinned at their initial values through its
environment tunables: left to adapt, glibc sometimes reuses such blocks on its own and sometimes
not (24,500 or 256 faults a round, from one run of this script to the next), which would leave
the comparison to chance. Pinned, the default process faults every round in, and the other shows
that keep_freed_memory overrides the thresholds it started with."""

import os
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys
import torch
from fourbit.train.allocator import keep_freed_memory
done = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = None
for round in range(6):  # a training step's pattern: big blocks allocated, written, freed, again
    if round == 2:
        before = faults()
    blocks = [torch.ones(1 << 20) for _ in range(24)]  # 24 blocks of 4 MiB
    del blocks
print(done, faults() - before)
"""


def faults_per_round(mode: str) -> tuple[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env=env).stdout
    done, faults = out.split()
    return done, int(faults) / 4


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory sets glibc's malloc; this C library is another")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    _, default = faults_per_round("default")
    done, kept = faults_per_round("keep")
    assert done == "True"
    # 96 MiB a round is 24,576 pages of 4 KiB: glibc maps and faults in each block afresh (past its
    # 128 KiB mmap threshold); kept, the rounds reuse the heap's blocks
    assert default > 20_000
    assert kept < 1_000

