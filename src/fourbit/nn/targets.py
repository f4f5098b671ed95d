"""Which linear layers fourbit quantizes and adapts: every ``nn.Linear`` but the LM head.

The head stays in 16 bits, as bitsandbytes' 4-bit loading and PEFT's "all-linear" leave it: it
is one matrix, its error lands directly on the logits, and its rows are touched once per token.
Loading (io/loader.py), post-training quantization (ptq/), re-quantizing a merge (io/merge.py),
LoRA's default targets (nn/lora.py) and the serving adapters all read this one definition.

LoRA's ``target`` follows PEFT's rules (:func:`select_targets`): "all-linear" (or "all") is
every linear layer but the kept-dense ones; a string is a regular expression that must match
the whole module path; a list names modules exactly or by their last dotted components
(``q_proj`` matches ``model.layers.0.self_attn.q_proj``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from ..errors import InputError
from .frozen_linear import FrozenLinear

KEEP_DENSE = ("lm_head",)
LINEAR_TYPES = (nn.Linear, FrozenLinear)  # what LoRA wraps: dense linears and every quantized one
ALL_LINEAR = ("all-linear", "all")


def kept_dense(name: str, keep: Iterable[str] = KEEP_DENSE) -> bool:
    """Whether the module at path ``name`` is one of ``keep``: by its full path or its last part."""
    keep = tuple(keep)
    return name in keep or name.rsplit(".", 1)[-1] in keep


def quantizable_linears(model: nn.Module, keep: Iterable[str] = KEEP_DENSE) -> list[tuple[str, nn.Linear]]:
    """(path, layer) for every plain ``nn.Linear`` of ``model`` that is not kept dense."""
    keep = tuple(keep)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not kept_dense(n, keep)]


def match_targets(model: nn.Module, target: str | Iterable[str], exclude: Iterable[str] = KEEP_DENSE) -> list[str]:
    """Paths of the linear modules of ``model`` that ``target`` selects (those already inside a
    LoRA layer, its base and factors, are not candidates)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and not _inside_lora(n)]
    return select_targets(linears, target, exclude)


def select_targets(linears: list[str], target: str | Iterable[str], exclude: Iterable[str] = KEEP_DENSE) -> list[str]:
    """The paths among ``linears`` that ``target`` selects; an InputError where it selects none."""
    excluded = set(exclude)
    if isinstance(target, str) and target in ALL_LINEAR:
        chosen = [n for n in linears if not kept_dense(n, excluded)]
    elif isinstance(target, str):
        try:
            pattern = re.compile(target)
        except re.error as e:
            raise InputError(f"lora_target {target!r} is not a valid regular expression: {e}") from None
        chosen = [n for n in linears if pattern.fullmatch(n)]
    else:
        names = list(target)
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in names)]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise InputError(
            f"lora_target {target!r} matches no linear module; this model's linear modules are named {leaves} "
            f"(or use 'all-linear')"
        )
    return chosen


def _inside_lora(name: str) -> bool:
    parts = name.split(".")
    return "lora_A" in parts or "lora_B" in parts or "base_layer" in parts
