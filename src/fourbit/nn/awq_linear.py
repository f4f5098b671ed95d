"""AWQLinear: a frozen linear layer stored in AWQ's GEMM checkpoint layout (quant/awq_layout.py).

    y = x @ W^T + b,    W[o, i] = (code[o, i] - zero[i // G, o]) * scales[i // G, o]

The buffers are the checkpoint's tensors as AutoAWQ's WQLinear_GEMM stores them (``qweight``
[in, out/8], ``qzeros`` [in/G, out/8], ``scales`` float16 [in/G, out], ``bias`` float16), so
``state_dict()`` is the layer's part of an AWQ folder and ``load_state_dict`` reads one. AWQ's
activation scales are already folded into the previous norm or linear and into these codes:
the layer is a plain group-quantized linear. Forward, backward (a LoRA base) and dtype casts are
PackedLinear's (nn/packed_linear.py), shared with GPTQLinear.
"""

from __future__ import annotations

import torch

from ..quant.awq_layout import BITS, PER_WORD, check_awq_shape, pack_awq, unpack_awq
from .packed_linear import PackedLinear


class AWQLinear(PackedLinear):
    pack = staticmethod(pack_awq)
    unpack = staticmethod(unpack_awq)
    stored_names = ("qweight", "qzeros", "scales")

    def __init__(self, in_features: int, out_features: int, bits: int = BITS, group_size: int = 128,
                 bias: bool = False, compute_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        check_awq_shape(bits, group_size, in_features, out_features)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size
        self.compute_dtype = compute_dtype
        groups = 1 if group_size == -1 else in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features, out_features // PER_WORD, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // PER_WORD, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None)
