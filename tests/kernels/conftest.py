"""Where the kernel tests run: the GPU when there is one, else Triton's CPU interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before any kernel is imported)."""

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def _rounding_bound(ref32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far a kernel's ``dtype`` output may sit from a float32 reference value: 2 eps |x|.

    One ulp (at most eps |x|) because a compiled kernel may contract the double-quant
    scale's multiply and add into an FMA, moving the scale by a float32 ulp and so the rounded
    output by up to one ulp; one more because Triton's CPU interpreter (3.9) converts float32
    to bfloat16 by truncation (runtime/interpreter.py, cast_impl) where the GPU rounds to
    nearest, which costs up to one ulp on its own.
    """
    return 2 * torch.finfo(dtype).eps * ref32.abs()


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def rounding_bound():
    return _rounding_bound
