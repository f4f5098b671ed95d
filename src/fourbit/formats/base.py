"""What every quantization format provides (formats/__init__.py lists them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class Format:
    """A checkpoint format of quantized linear layers. Subclasses set ``name`` and ``layer_type``."""

    name: str
    layer_type: type[nn.Module]
    marker: str  # the tensor a quantized layer P stores as P.<marker>: how the checkpoint shows which layers are

    def detect(self, qconfig: dict) -> dict | None:
        """This format's settings from a checkpoint's quantization_config; None if another format's."""
        raise NotImplementedError

    def layer(self, linear: nn.Module, settings: dict, compute_dtype: torch.dtype) -> nn.Module:
        """An empty layer of this format (on the meta device) for ``linear``'s shape and bias."""
        raise NotImplementedError

    def quantization_config(self, **settings: Any) -> dict:
        """config.json ``quantization_config`` of a folder in this format."""
        raise NotImplementedError


@dataclass(frozen=True)
class StoredFormat:
    """A checkpoint's format and the settings its quantization_config gives."""

    format: Format
    settings: dict
