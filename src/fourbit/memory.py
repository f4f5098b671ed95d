"""Memory report: where a loaded model's bytes are, measured from its actual tensors.

For the quantized linears (and 4-bit MoE experts, per expert matrix), per weight of n parameters in
blocks of B (nested blocks of 256):

    4-bit codes        n / 2 bytes                               4 bits / parameter
    absmax             4 n/B bytes (1 n/B with double quant)     32/B   (8/B)
    nested absmax      4 n/(256 B) bytes + 4 for the offset      32/(256 B)
    code tables        16 + 256 float32 per weight, a constant   (not per parameter)

so NF4 with double quantization at B = 64 costs 4 + 8/64 + 32/16384 = 4.127 bits per
quantized parameter (4.5 without double quantization). Tied tensors are counted once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .nn.linear4bit import Linear4bit


@dataclass
class MemoryReport:
    rows: dict[str, int] = field(default_factory=dict)  # component -> bytes
    quantized_params: int = 0
    other_params: int = 0
    other_dtypes: set[str] = field(default_factory=set)

    @property
    def total_bytes(self) -> int:
        return sum(self.rows.values())

    def bits_per_quantized_param(self, with_tables: bool = False) -> float:
        keys = ["4-bit codes", "absmax", "nested absmax + offset"] + (["code tables"] if with_tables else [])
        return 8 * sum(self.rows.get(k, 0) for k in keys) / max(self.quantized_params, 1)

    def format(self, title: str = "") -> str:
        lines = [title] if title else []
        lines.append(f"{'component':<28}{'bytes':>16}{'MiB':>10}{'bits/param':>12}")
        for name, nbytes in self.rows.items():
            params = self.other_params if name.startswith("unquantized") else self.quantized_params
            bits = f"{8 * nbytes / params:.3f}" if params else "-"
            lines.append(f"{name:<28}{nbytes:>16,}{nbytes / 2**20:>10.2f}{bits:>12}")
        lines.append(f"{'total':<28}{self.total_bytes:>16,}{self.total_bytes / 2**20:>10.2f}")
        if self.quantized_params:
            lines.append(
                f"quantized parameters: {self.quantized_params:,} at "
                f"{self.bits_per_quantized_param():.3f} bits each "
                f"({self.bits_per_quantized_param(with_tables=True):.3f} with the code tables)"
            )
        lines.append(f"unquantized parameters: {self.other_params:,} ({', '.join(sorted(self.other_dtypes)) or '-'})")
        return "\n".join(lines)


def memory_report(model: nn.Module) -> MemoryReport:
    report = MemoryReport()
    rows = dict.fromkeys(["4-bit codes", "absmax", "nested absmax + offset", "code tables"], 0)
    seen: set[int] = set()
    other = 0

    def first_time(t: torch.Tensor) -> bool:
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return False
        seen.add(key)
        return True

    def add_4bit(codes: torch.Tensor, state) -> None:
        report.quantized_params += state.numel
        rows["4-bit codes"] += _nbytes(codes)
        rows["absmax"] += _nbytes(state.absmax)
        rows["code tables"] += _nbytes(state.code)
        if state.nested is not None:
            rows["nested absmax + offset"] += _nbytes(state.nested.absmax) + _nbytes(state.nested.offset)
            rows["code tables"] += _nbytes(state.nested.code)

    for module in model.modules():
        experts = getattr(module, "experts_4bit", {})  # MoE weights, one state per expert (nn/experts4bit.py)
        for name, states in experts.items():
            codes = module._parameters[name]
            first_time(codes)
            for expert, state in enumerate(states):
                add_4bit(codes[expert], state)
        if isinstance(module, Linear4bit) and module.quant_state is not None:
            add_4bit(module.weight, module.quant_state)
            if module.bias is not None and first_time(module.bias):
                other += _nbytes(module.bias)
                report.other_params += module.bias.numel()
                report.other_dtypes.add(str(module.bias.dtype).removeprefix("torch."))
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if t is None or not first_time(t):
                continue
            other += _nbytes(t)
            if isinstance(t, nn.Parameter):
                report.other_params += t.numel()
                report.other_dtypes.add(str(t.dtype).removeprefix("torch."))
    report.rows = {k: v for k, v in rows.items() if v} | {"unquantized (params+buffers)": other}
    return report


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
