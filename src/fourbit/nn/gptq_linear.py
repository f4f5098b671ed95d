"""GPTQLinear: a frozen linear layer stored in GPTQ's v1 checkpoint layout (quant/gptq_layout.py).

    y = x @ W^T + b,    W[o, i] = scales[g_idx[i], o] * (code[o, i] - zero[g_idx[i], o])

The buffers are the checkpoint's tensors as they are stored (``qweight``, ``qzeros``,
``scales``, ``g_idx``, ``bias``), so ``state_dict()`` is the layer's part of a GPTQ folder and
``load_state_dict`` reads one. Forward, backward (a LoRA base) and dtype casts are
PackedLinear's (nn/packed_linear.py), shared with AWQLinear.
"""

from __future__ import annotations

import torch

from ..quant.gptq_layout import pack_gptq, unpack_gptq
from .packed_linear import PackedLinear


class GPTQLinear(PackedLinear):
    pack = staticmethod(pack_gptq)
    stored_names = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128, bias: bool = False,
                 compute_dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size
        self.compute_dtype = compute_dtype
        per_word = 32 // bits
        groups = 1 if group_size == -1 else in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features // per_word, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // per_word, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None)

    def unpack(self, tensors: dict[str, torch.Tensor]):
        return unpack_gptq(tensors, self.bits)
