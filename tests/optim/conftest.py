"""Run the optimizer tests single-threaded.

Their tensors have at most ~1e5 elements, too small for intra-op threads to help; on a busy
2-core machine torch's OpenMP workers spin-wait on each other and the same tests ran 30-100x
slower with 2 threads than with 1. The setting is restored after each test.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
