"""Which linear layers fourbit quantizes and adapts: every ``nn.Linear`` but the LM head.

The head stays in 16 bits, as bitsandbytes' 4-bit loading and PEFT's "all-linear" leave it: it
is one matrix, its error lands directly on the logits, and its rows are touched once per token.
Loading (io/loader.py), post-training quantization (ptq/), re-quantizing a merge (io/merge.py),
LoRA's default targets (nn/lora.py) and the serving adapters all read this one definition.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

KEEP_DENSE = ("lm_head",)


def kept_dense(name: str, keep: Iterable[str] = KEEP_DENSE) -> bool:
    """Whether the module at path ``name`` is one of ``keep``: by its full path or its last part."""
    keep = tuple(keep)
    return name in keep or name.rsplit(".", 1)[-1] in keep


def quantizable_linears(model: nn.Module, keep: Iterable[str] = KEEP_DENSE) -> list[tuple[str, nn.Linear]]:
    """(path, layer) for every plain ``nn.Linear`` of ``model`` that is not kept dense."""
    keep = tuple(keep)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not kept_dense(n, keep)]
