"""DenseLinear: ``nn.Linear`` whose products of a few rows on a CPU read the weight in place.

    y = x @ W^T + b         (what nn.Linear computes; the same parameters, the same state_dict)

A decoded token multiplies the output head, a 16-bit layer that load_model keeps dense (49152 x
576 in SmolLM2, tied to the embeddings), with one row per sequence. On a CPU ``F.linear`` hands
that to oneDNN, which reorders the whole weight at every call: 3.2 ms a token for SmolLM2's head
in bf16, where reading it once takes about 1.3 (bench/RESULTS.md, issue 20). Prepacking it once
(kernels/prepacked_linear.py) would be as fast but hold a second copy of the head; here the
native kernel (kernels/cpu/native.py, ``matmul_dense``) reads the weight where it lies, for up to
``MAX_ROWS_DENSE`` rows without a gradient. Everything else (training, long prompts, other
devices, compiled graphs) is nn.Linear's own forward, the twin the kernel is tested against.

A float32 weight that is exactly 8-bit codes times a scale per block of 32 (quant/q8_blocks.py:
a head read from a Q8_0 GGUF tensor, as the embedded SmolLM2's is) is read in that form instead
(``matmul_q8``: a quarter of the bytes, bit-identical results), 113 -> 31 MB a token for
SmolLM2's head. The form is looked for at the first such product (about 0.1 s for SmolLM2's head)
and again whenever the weight changes, and kept beside the weight: 28% more memory for the head
in float32 where a weight has the form, none where it has not.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.cpu import native
from ..quant.q8_blocks import q8_blocks


class DenseLinear(nn.Linear):
    """An ``nn.Linear`` with the few-row CPU path; build it with :meth:`from_linear`."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DenseLinear:
        """A DenseLinear holding ``linear``'s own parameters (not copies: a tied weight stays tied)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                                  or (self.bias is not None and self.bias.requires_grad))
        if not wants_grad and not torch.compiler.is_compiling() and native.supports_dense(x, self.weight):
            blocks = self._q8_blocks() if x.dtype == torch.float32 else None
            if blocks is not None:
                return native.matmul_q8(x, *blocks, self.bias)
            return native.matmul_dense(x, self.weight, self.bias)
        return super().forward(x)

    def _q8_blocks(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The float32 weight's 8-bit form, or None where it has none: looked for on first use and
        again once the weight is replaced or changed in place (its storage or version moved)."""
        weight = self.weight
        key = (weight.data_ptr(), weight._version, weight.shape)
        cached = self.__dict__.get("_q8")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_q8"] = (key, q8_blocks(weight.detach()))
        return cached[1]

    def __getstate__(self):  # copies and pickles leave the form out (it is found again on use)
        return {key: value for key, value in self.__dict__.items() if key != "_q8"}
