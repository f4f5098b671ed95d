"""The LoRA update's scale, one definition for the LoRA layer (nn/lora.py), the expert weights'
LoRA (nn/lora_experts.py) and the adapter reader (io/peft.py):

    y = base(x) + s * B A x,     s = alpha / r          (LoRA, Hu et al. 2021; PEFT's default)
                                 s = alpha / sqrt(r)    (rsLoRA: the update's scale stays put as r grows)
"""

from __future__ import annotations

import math


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r
