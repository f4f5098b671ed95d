"""AWQLinear's state is the AWQ GEMM checkpoint layout (forward and LoRA: test_packed_linear.py)."""

import pytest
import torch

from fourbit.nn import AWQLinear
from fourbit.quant.groupwise import quantize_rtn


def test_state_dict_is_the_gemm_layout_and_round_trips():
    torch.manual_seed(0)
    layer = AWQLinear.from_quant(quantize_rtn(torch.randn(32, 128) * 0.1, 4, 64, sym=False), torch.randn(32), 64)
    state = layer.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
        "qweight": (torch.int32, (128, 4)), "qzeros": (torch.int32, (2, 4)), "scales": (torch.float16, (2, 32)),
        "bias": (torch.float16, (32,)),
    }
    fresh = AWQLinear(128, 32, group_size=64, bias=True)
    fresh.load_state_dict(state)
    x = torch.randn(4, 128)
    assert torch.equal(fresh(x), layer(x))


def test_shapes_the_layout_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="group_size 48 does not divide the input dimension 128"):
        AWQLinear(128, 32, group_size=48)
    with pytest.raises(ValueError, match="4-bit codes only"):
        AWQLinear(128, 32, bits=3)
