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
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.cpu import native


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
            return native.matmul_dense(x, self.weight, self.bias)
        return super().forward(x)
