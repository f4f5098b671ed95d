"""LoRA adapters in PEFT's format, so `peft.PeftModel.from_pretrained` reads ours and we read its.

A PEFT LoRA adapter is a folder with two files:

    adapter_config.json        peft_type "LORA", r, lora_alpha, lora_dropout, target_modules
                               (a list of names, or a regex string), use_rslora, use_dora, bias,
                               task_type, base_model_name_or_path, ... (unknown keys are ignored)
    adapter_model.safetensors  base_model.model.<module path>.lora_A.weight      [r, in]
                               base_model.model.<module path>.lora_B.weight      [out, r]
                               base_model.model.<module path>.lora_magnitude_vector  [out] (DoRA)
                               metadata {"format": "pt"}

LoRA on mixture-of-experts weights (``target_parameters`` in the config, full parameter names)
keeps each 3-D expert weight's factors under its experts module, one ``base_layer.`` deeper per
targeted weight registered after it: ``<experts>.base_layer.lora_A.weight`` [r*E, in] and
``<experts>.lora_B.weight`` [out, r*E] for Mixtral's gate_up_proj and down_proj (layout:
nn/lora_experts.py).

Module paths are those of the transformers model (``model.layers.0.self_attn.q_proj``), which
are ours too; the file holds one adapter, ours named "default" (nn/lora.py), whose parameters
keep PEFT's names: the file key is the module path with the ``base_model.model.`` prefix and the
parameter's name. What we do not support (rank/alpha patterns,
modules_to_save, trained biases, layer subsets, non-LoRA PEFT types) is refused by name rather
than silently dropped.

fourbit adds a third file, which PEFT does not read: ``training_base.json``, how the base was
quantized when the adapter was trained (``{"quantization": "nf4", "double_quant": true,
"blocksize": 64}``; quantization "none" for a 16-bit base, or the stored format of a GPTQ, AWQ or
int8 base). The adapter learned to correct that base's quantization error, so merging it into
another base (16-bit weights for an adapter trained on NF4, or the reverse) changes what it
computes; ``fourbit merge`` reads the file to rebuild the base the adapter saw.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import InputError
from ..nn.awq_linear import AWQLinear
from ..nn.gptq_linear import GPTQLinear
from ..nn.linear4bit import Linear4bit
from ..nn.linear8bit import Linear8bit
from ..nn.lora import add_lora, lora_adapters, lora_settings
from ..nn.lora_experts import expert_lora_layers, peft_key
from ..nn.lora_scaling import lora_scaling
from .atomic import atomic_dir

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_FILE = "training_base.json"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys."""
    return {k: _whole(v).detach().contiguous().cpu() for k, v in _adapter_parameters(model).items()}


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's parameters, by PEFT's keys."""
    tensors = {}
    for name, adapter in lora_adapters(model).items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = adapter.lora_A.weight
        tensors[f"{PREFIX}{name}.lora_B.weight"] = adapter.lora_B.weight
        if adapter.use_dora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = adapter.lora_magnitude_vector
    for key, experts in expert_lora_layers(model).items():
        where = peft_key(model, key)
        tensors[f"{PREFIX}{where}.lora_A.weight"] = experts.lora_A.weight
        tensors[f"{PREFIX}{where}.lora_B.weight"] = experts.lora_B.weight
    if not tensors:
        raise InputError("the model has no LoRA adapters to save; call fourbit.add_lora first")
    return tensors


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor sharded by FSDP2 (a DTensor) gathered whole: a collective, every rank calls it."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    settings = lora_settings(model)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or getattr(model.config, "_name_or_path", None),
        "revision": None,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "bias": "none",
        "target_modules": sorted(settings.modules),
        "target_parameters": sorted(settings.parameters) or None,
        "exclude_modules": None,
        "modules_to_save": None,
        "use_rslora": settings.use_rslora,
        "use_dora": settings.use_dora,
        "init_lora_weights": True,
        "fan_in_fan_out": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def save_adapter(
    model: nn.Module, folder: str | os.PathLike, base_model_name_or_path: str | None = None, overwrite: bool = False
) -> Path:
    """Write the model's LoRA adapter as a PEFT folder, atomically."""
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        write_adapter_files(model, tmp, base_model_name_or_path)
    return Path(folder)


def write_adapter_files(
    model: nn.Module, folder: Path, base_model_name_or_path: str | None = None, tensors: dict | None = None
) -> None:
    """The two PEFT files, into an existing folder (callers make the folder atomic); ``tensors``:
    the adapter_state_dict when the caller already gathered it."""
    tensors = adapter_state_dict(model) if tensors is None else tensors
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(adapter_config(model, base_model_name_or_path), indent=2))
    (folder / BASE_FILE).write_text(json.dumps(training_base(model), indent=2))


def training_base(model: nn.Module) -> dict:
    """How the layers under the adapter are quantized: what training_base.json records."""
    kinds = {_base_kind(model.get_submodule(name).base_layer) for name in lora_adapters(model)}
    kinds |= {_experts_kind(model, key) for key in expert_lora_layers(model)}
    if len(kinds) != 1:
        raise InputError(f"the adapted layers have bases of {len(kinds)} kinds ({sorted(map(str, kinds))}); "
                         "an adapter is trained on one base")
    quantization, double_quant, blocksize = kinds.pop()
    return {"quantization": quantization, "double_quant": double_quant, "blocksize": blocksize}


def read_training_base(folder: str | os.PathLike) -> dict | None:
    """The adapter's training_base.json, or None where it has none (made by PEFT or an older fourbit)."""
    path = Path(folder) / BASE_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if not isinstance(record, dict) or "quantization" not in record:
        raise InputError(f"{path}: expected an object with 'quantization' (nf4, fp4, int4, none, gptq, awq or int8)")
    return record


def _base_kind(base: nn.Module) -> tuple:
    if isinstance(base, Linear4bit):
        return base.quant_type, base.double_quant, base.blocksize
    for kind, name in ((GPTQLinear, "gptq"), (AWQLinear, "awq"), (Linear8bit, "int8")):
        if isinstance(base, kind):
            return name, None, None
    return "none", None, None


def _experts_kind(model: nn.Module, key: str) -> tuple:
    module_name, _, name = key.rpartition(".")
    states = getattr(model.get_submodule(module_name), "experts_4bit", {}).get(name)
    if states is None:
        return "none", None, None
    return states[0].quant_type, states[0].nested is not None, states[0].blocksize


def read_adapter_config(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter: it has no {CONFIG_FILE}")
    config = json.loads(path.read_text())
    unsupported = {
        "peft_type": (config.get("peft_type", "LORA"), "LORA"),
        "bias": (config.get("bias", "none"), "none"),
    }
    for key, (value, allowed) in unsupported.items():
        if value != allowed:
            raise InputError(f"{path}: {key}={value!r} is not supported; fourbit loads {key}={allowed!r} adapters")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if config.get(key):
            raise InputError(f"{path}: {key}={config[key]!r} is not supported yet; only uniform LoRA adapters load")
    if config.get("fan_in_fan_out"):
        raise InputError(f"{path}: fan_in_fan_out adapters (Conv1D bases) are not supported")
    return config


@dataclass
class AdapterFiles:
    """A PEFT adapter folder as read from disk: its checked config and its tensors (PEFT's keys)."""

    folder: Path
    config: dict
    tensors: dict[str, torch.Tensor]

    @property
    def r(self) -> int:
        return self.config["r"]

    @property
    def alpha(self) -> float:
        return self.config.get("lora_alpha", 8)  # PEFT's default

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.config.get("use_rslora", False))

    def take_pair(self, module: str, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove and return ``module``'s (lora_A, lora_B), checked against the layer's shape and for
        NaN/Inf; an InputError names what does not fit."""
        a, b = (self.tensors.pop(f"{PREFIX}{module}.lora_{x}.weight", None) for x in "AB")
        if a is None or b is None:
            raise InputError(f"adapter {self.folder} targets {module} but holds no lora_A/lora_B for it")
        for tensor, shape, which in ((a, (self.r, in_features), "lora_A"), (b, (out_features, self.r), "lora_B")):
            _check_tensor(tensor, shape, f"{module}.{which}")
        return a, b


def read_adapter(folder: str | os.PathLike) -> AdapterFiles:
    """The one reader of adapter folders (training's resume and load_adapter, merge, export and
    serving): the config checked by :func:`read_adapter_config`, the tensors from safetensors only."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE}: only safetensors adapters are loaded (adapter_model.bin "
                                "pickles are not)")
    with safe_open(weights, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return AdapterFiles(folder, config, tensors)


def load_adapter(
    model: nn.Module, folder: str | os.PathLike, is_trainable: bool = False, dtype: torch.dtype | None = None
) -> nn.Module:
    """Wrap ``model``'s target modules with LoRA and load a PEFT adapter's weights into them.

    Every module the config targets must get its tensors from the file and every tensor in the
    file must belong to a targeted module of this model, else a ValueError names the mismatch
    (an adapter made for another base). Frozen unless ``is_trainable``.
    """
    adapter = read_adapter(folder)
    config, tensors = adapter.config, adapter.tensors
    file_dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    try:
        add_lora(
            model, r=adapter.r, alpha=adapter.alpha, target=config["target_modules"],
            dropout=config.get("lora_dropout", 0.0), use_rslora=config.get("use_rslora", False),
            use_dora=config.get("use_dora", False), dtype=dtype or file_dtype, verbose=False,
            target_parameters=config.get("target_parameters"),
        )
    except ValueError as e:
        raise InputError(f"adapter {adapter.folder} does not fit this model: {e}") from None
    load_adapter_weights(model, tensors, str(adapter.folder))
    for p in _adapter_parameters(model).values():
        p.requires_grad_(is_trainable)
    return model


def load_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor], where: str = "adapter") -> None:
    """Copy PEFT-keyed tensors into the model's existing LoRA layers; all must match exactly."""
    targets = _adapter_parameters(model)
    missing = sorted(set(targets) - set(tensors))
    extra = sorted(set(tensors) - set(targets))
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise InputError(f"{where} does not fit this model ({len(missing)} missing, {len(extra)} unexpected tensors: {detail})")
    for key, target in targets.items():
        _copy(target, tensors[key], key.removeprefix(PREFIX))


def _copy(target: nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    _check_tensor(tensor, tuple(target.shape), name)
    with torch.no_grad():
        target.copy_(tensor)


def _check_tensor(tensor: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise InputError(f"adapter tensor {name} has shape {tuple(tensor.shape)}; this model's layer needs {tuple(shape)}")
    if not torch.isfinite(tensor).all():
        raise InputError(f"adapter tensor {name} holds NaN/Inf values")
