"""Optimizers: AdamW with 32-bit or block-wise 8-bit state, optionally paged to host memory.

``build_optimizer`` maps the names the ecosystem uses (transformers' ``optim=`` values,
bitsandbytes' classes) onto :class:`AdamW`:

    adamw, adamw_torch      32-bit state            (torch.optim.AdamW)
    adamw_8bit              8-bit block-wise state  (bitsandbytes AdamW8bit)
    paged_adamw_32bit       32-bit state, paged     (bitsandbytes PagedAdamW32bit)
    paged_adamw_8bit        8-bit state, paged      (bitsandbytes PagedAdamW8bit)
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import InputError
from .adamw import AdamW
from .paged import PAGE_MIN_NUMEL, Pager

_SETTINGS = {  # name -> (optim_bits, paged)
    "adamw": (32, False),
    "adamw_torch": (32, False),
    "adamw_8bit": (8, False),
    "paged_adamw_32bit": (32, True),
    "paged_adamw_8bit": (8, True),
}
OPTIMIZERS = tuple(_SETTINGS)


def build_optimizer(
    name: str,
    params: Iterable,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> AdamW:
    """The :class:`AdamW` that ``name`` stands for (one of :data:`OPTIMIZERS`)."""
    if name not in _SETTINGS:
        raise InputError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    optim_bits, paged = _SETTINGS[name]
    return AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optim_bits=optim_bits, paged=paged)


__all__ = ["AdamW", "OPTIMIZERS", "PAGE_MIN_NUMEL", "Pager", "build_optimizer"]
