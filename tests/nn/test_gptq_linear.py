"""GPTQLinear's state is the GPTQ v1 checkpoint layout (forward and LoRA: test_packed_linear.py)."""

import torch

from fourbit.nn import GPTQLinear
from fourbit.quant.groupwise import quantize_rtn


def test_state_dict_is_the_checkpoint_layout_and_round_trips():
    torch.manual_seed(0)
    layer = GPTQLinear.from_quant(quantize_rtn(torch.randn(32, 128) * 0.1, 4, 64, sym=False), torch.randn(32), 64)
    state = layer.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
        "qweight": (torch.int32, (16, 32)), "qzeros": (torch.int32, (2, 4)), "scales": (torch.float16, (2, 32)),
        "g_idx": (torch.int32, (128,)), "bias": (torch.float16, (32,)),
    }
    fresh = GPTQLinear(128, 32, bits=4, group_size=64, bias=True)
    fresh.load_state_dict(state)
    x = torch.randn(4, 128)
    assert torch.equal(fresh(x), layer(x))
