"""Several LoRA adapters on one base model, chosen per call or per row of a batch.

    y_i = base(x_i) + sum_a w_ia * s_a * (x_i A_a^T) B_a^T

For each row i, w_i is a mixture of the loaded adapters: ``None`` or ``{}`` (the base alone),
``"a"`` (adapter a, weight 1), ``{"a": 0.5, "b": 0.3}`` (the weighted sum of the updates; this is
PEFT's "cat" combination, exact for any ranks, not its "linear" one that mixes A and B
themselves). Every linear layer of the base is wrapped once by :class:`MultiLoRALinear`, which
holds each adapter's (A, B, s) for that layer; adding or removing an adapter touches only
those small tensors, never the (4-bit) base. A row's update is computed on that row's inputs
alone, so a mixed batch gives every row what it would get on its own (up to float rounding of
the batched base product).

The choice is set for the duration of a ``with adapters.use(...)`` block, on the modules: one
batch at a time, from one thread (the server's worker). Adapters load from PEFT folders in
safetensors only; a tensor that fits no layer of this base, a layer the config targets but the
file lacks, NaN/Inf, or DoRA (merge it instead) are refused with the tensor's name.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from ..io.peft import read_adapter
from ..nn.lora import match_targets, select_targets
from ..nn.targets import KEEP_DENSE

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
Choice = str | dict[str, float] | None


class _Adapter(nn.Module):
    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float):
        super().__init__()
        self.register_buffer("A", a)
        self.register_buffer("B", b)
        self.scaling = scaling


class MultiLoRALinear(nn.Module):
    """A frozen linear layer with any number of named LoRA updates; ``route`` picks them."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()  # keys: adapter names with '.' replaced (ModuleDict keys)
        self.route: dict[str, float] | list[dict[str, float]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        route = self.route
        if not route or not len(self.adapters):
            return y
        if isinstance(route, dict):  # the same mixture for every row
            for name, weight in route.items():
                if _key(name) in self.adapters:
                    y = y + (weight * _update(self.adapters[_key(name)], x)).to(y.dtype)
            return y
        for name in {n for mixture in route for n in mixture}:
            if _key(name) not in self.adapters:
                continue
            weights = torch.tensor([mixture.get(name, 0.0) for mixture in route], device=x.device)
            rows = weights.nonzero().flatten()
            update = _update(self.adapters[_key(name)], x[rows]) * weights[rows].view(-1, *[1] * (x.dim() - 1))
            y = y.index_add(0, rows, update.to(y.dtype))
        return y


def _update(adapter: _Adapter, x: torch.Tensor) -> torch.Tensor:
    return F.linear(F.linear(x.to(adapter.A.dtype), adapter.A), adapter.B) * adapter.scaling


def _key(name: str) -> str:
    return name.replace(".", "\u2024")  # ModuleDict keys cannot hold '.'


class AdapterSet:
    """The adapters loaded on ``model`` (wrapped in place, every linear layer but lm_head)."""

    def __init__(self, model: nn.Module, exclude: tuple[str, ...] = KEEP_DENSE):
        if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
            raise InputError("this model is already wrapped for serving adapters; use its existing AdapterSet")
        self.model = model
        self.layers: dict[str, MultiLoRALinear] = {}
        for name in match_targets(model, "all-linear", exclude):
            layer = MultiLoRALinear(model.get_submodule(name))
            model.set_submodule(name, layer)
            self.layers[name] = layer
        self.folders: dict[str, Path] = {}

    @property
    def names(self) -> list[str]:
        return list(self.folders)

    def add(self, name: str, folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> None:
        """Load the PEFT adapter at ``folder`` under ``name``; the base is not touched."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise InputError(f"adapter name {name!r} must be 1-64 characters of letters, digits, _ . : - "
                             "(starting with a letter or digit)")
        if name in self.folders:
            raise InputError(f"an adapter named {name!r} is already loaded; remove it first")
        adapter = read_adapter(folder)
        folder, config = adapter.folder, adapter.config
        if config.get("use_dora"):
            raise InputError(f"{folder}: DoRA adapters cannot be served side by side; merge it (fourbit merge) instead")
        if config.get("target_parameters"):
            raise InputError(f"{folder}: adapters on mixture-of-experts weights (target_parameters) cannot be served side "
                             "by side yet; merge it (fourbit merge) instead")
        try:
            targets = select_targets(list(self.layers), config["target_modules"], exclude=())
        except ValueError as e:
            raise InputError(f"adapter {folder} does not fit this model: {e}") from None
        pairs = {}
        for target in targets:
            base = self.layers[target].base_layer
            pairs[target] = adapter.take_pair(target, base.in_features, base.out_features)
        if adapter.tensors:
            raise InputError(f"adapter {folder} holds {len(adapter.tensors)} tensors that fit no targeted layer of this "
                             f"model, e.g. {sorted(adapter.tensors)[0]}")
        scaling = adapter.scaling
        device = next(self.model.parameters()).device
        for target, (a, b) in pairs.items():
            self.layers[target].adapters[_key(name)] = _Adapter(a.to(device, dtype), b.to(device, dtype), scaling)
        self.folders[name] = folder

    def remove(self, name: str) -> None:
        if name not in self.folders:
            raise KeyError(f"no adapter named {name!r} is loaded (loaded: {self.names})")
        for layer in self.layers.values():
            if _key(name) in layer.adapters:
                del layer.adapters[_key(name)]
        del self.folders[name]

    @contextlib.contextmanager
    def use(self, choice: Choice | list[Choice]) -> Iterator[None]:
        """Within the block the model computes with ``choice``: one for all rows, or a list, one per row."""
        route = [self._mixture(c) for c in choice] if isinstance(choice, list) else self._mixture(choice)
        for layer in self.layers.values():
            layer.route = route
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.route = None

    def _mixture(self, choice: Choice) -> dict[str, float]:
        if choice is None:
            return {}
        mixture = {choice: 1.0} if isinstance(choice, str) else dict(choice)
        unknown = [n for n in mixture if n not in self.folders]
        if unknown:
            raise InputError(f"no adapter named {unknown[0]!r} is loaded (loaded: {self.names})")
        return {n: float(w) for n, w in mixture.items() if w != 0}
