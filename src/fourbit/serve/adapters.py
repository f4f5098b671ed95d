"""Several LoRA adapters on one base model, chosen per call or per row of a batch.

Every linear layer of the base but the head is wrapped once by the LoRA layer training uses
(nn/lora.py), at first with no adapter; loading one adds its (A, B, s) to the layers it targets,
removing it deletes them, and neither touches the (4-bit) base. A choice is ``None`` or ``{}``
(the base alone), ``"a"`` (adapter a, weight 1) or ``{"a": 0.5, "b": 0.3}`` (the weighted sum of
the updates; the layer's ``route`` says how each is computed).

The choice is set for the duration of a ``with adapters.use(...)`` block, on the layers: one
batch at a time, from one thread (the server's worker); outside a block the model computes the
base alone. Adapters load from PEFT folders through the one adapter reader (io/peft.py); a
tensor that fits no layer of this base, a layer the config targets but the file lacks, NaN/Inf,
or DoRA (merge it instead) are refused with the tensor's name.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..io.peft import read_adapter
from ..nn.lora import LoRALinear, Mixture, lora_layers
from ..nn.targets import KEEP_DENSE, match_targets, select_targets

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
Choice = str | dict[str, float] | None
BASE_ALONE: Mixture = {}


class AdapterSet:
    """The adapters loaded on ``model`` (wrapped in place, every linear layer but lm_head)."""

    def __init__(self, model: nn.Module, exclude: tuple[str, ...] = KEEP_DENSE):
        if lora_layers(model):
            raise InputError("this model already has LoRA layers; serve a base model (merge a trained adapter first, "
                             "or load it with --adapter)")
        self.model = model
        self.layers: dict[str, LoRALinear] = {}
        for name in match_targets(model, "all-linear", exclude):
            layer = LoRALinear(model.get_submodule(name))
            layer.route = BASE_ALONE
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
        except InputError as e:
            raise InputError(f"adapter {folder} does not fit this model: {e}") from None
        pairs = {}
        for target in targets:
            layer = self.layers[target]
            pairs[target] = adapter.take_pair(target, layer.in_features, layer.out_features)
        if adapter.tensors:
            raise InputError(f"adapter {folder} holds {len(adapter.tensors)} tensors that fit no targeted layer of this "
                             f"model, e.g. {sorted(adapter.tensors)[0]}")
        for target, (a, b) in pairs.items():
            added = self.layers[target].add_adapter(name, adapter.r, adapter.alpha,
                                                    use_rslora=config.get("use_rslora", False), dtype=dtype)
            added.requires_grad_(False)
            with torch.no_grad():
                added.lora_A.weight.copy_(a)
                added.lora_B.weight.copy_(b)
        self.folders[name] = folder

    def remove(self, name: str) -> None:
        if name not in self.folders:
            raise KeyError(f"no adapter named {name!r} is loaded (loaded: {self.names})")
        for layer in self.layers.values():
            if name in layer.names:
                layer.remove_adapter(name)
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
                layer.route = BASE_ALONE

    def _mixture(self, choice: Choice) -> Mixture:
        if choice is None:
            return BASE_ALONE
        mixture = {choice: 1.0} if isinstance(choice, str) else dict(choice)
        unknown = [n for n in mixture if n not in self.folders]
        if unknown:
            raise InputError(f"no adapter named {unknown[0]!r} is loaded (loaded: {self.names})")
        return {n: float(w) for n, w in mixture.items() if w != 0}
