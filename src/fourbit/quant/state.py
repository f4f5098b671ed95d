"""QuantState: everything needed to turn packed 4-bit codes back into a weight.

It serializes to plain tensors in bitsandbytes' "packed" layout, the one Hugging Face
bnb-4bit checkpoints store next to each quantized weight ``P.weight``:

    P.weight.absmax                          float32 [nblocks]  (uint8 with double quant)
    P.weight.quant_map                       float32 [16]       the code table
    P.weight.nested_absmax                   float32 [ceil(nblocks/256)]   double quant only
    P.weight.nested_quant_map                float32 [256]                 double quant only
    P.weight.quant_state.bitsandbytes__nf4   uint8 UTF-8 JSON: quant_type, blocksize, dtype,
                                             shape (+ nested_blocksize, nested_dtype,
                                             nested_offset with double quant)

:meth:`QuantState.to_dict` / :meth:`QuantState.from_dict` use the keys without the
``P.weight.`` prefix. ``from_dict`` checks every tensor's presence, dtype and shape against
the JSON, so a damaged checkpoint fails with a message naming the bad key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from ..errors import InputError
from .blockwise import check_blocksize
from .double_quant import NestedState, decompress_absmax
from .dtypes import QUANT_TYPES

STATE_KEY_PREFIX = "quant_state.bitsandbytes__"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class QuantState:
    quant_type: str  # "nf4" | "fp4" | "int4"
    blocksize: int
    shape: torch.Size  # of the original weight, [out, in] for a linear
    dtype: torch.dtype  # of the original weight; the default dequantization dtype
    absmax: torch.Tensor  # float32 [nblocks], or uint8 codes when nested is set
    code: torch.Tensor  # float32 [16]
    nested: NestedState | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def packed_shape(self) -> tuple[int, int]:
        return ((self.numel + 1) // 2, 1)

    def float_absmax(self) -> torch.Tensor:
        """The per-block scales as float32, decoding them first under double quantization."""
        if self.nested is None:
            return self.absmax
        return decompress_absmax(self.absmax, self.nested)

    def to(self, device: torch.device | str) -> QuantState:
        nested = self.nested.to(device) if self.nested is not None else None
        return QuantState(
            self.quant_type, self.blocksize, self.shape, self.dtype,
            self.absmax.to(device), self.code.to(device), nested,
        )

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state holds (for size accounting)."""
        nested = [self.nested.absmax, self.nested.code] if self.nested is not None else []
        return [self.absmax, self.code, *nested]

    # -- serialization -------------------------------------------------------------------

    def to_dict(self) -> dict[str, torch.Tensor]:
        meta = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        out = {"absmax": self.absmax, "quant_map": self.code}
        if self.nested is not None:
            meta |= {
                "nested_blocksize": self.nested.blocksize,
                "nested_dtype": "float32",
                "nested_offset": self.nested.offset.item(),
            }
            out |= {"nested_absmax": self.nested.absmax, "nested_quant_map": self.nested.code}
        blob = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
        out[STATE_KEY_PREFIX + self.quant_type] = blob
        return out

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor], where: str = "weight") -> QuantState:
        """Rebuild from :meth:`to_dict` output (or a checkpoint's tensors, prefix stripped).

        ``where`` names the weight in error messages, e.g. ``model.layers.0.mlp.up_proj.weight``.
        """
        state_keys = [k for k in tensors if k.startswith(STATE_KEY_PREFIX)]
        if len(state_keys) != 1:
            raise InputError(
                f"{where}: expected exactly one '{STATE_KEY_PREFIX}<type>' tensor, found {state_keys or 'none'}"
            )
        try:
            meta = json.loads(bytes(tensors[state_keys[0]].to("cpu", torch.uint8).tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{where}.{state_keys[0]}: not valid UTF-8 JSON ({e})") from None
        missing = {"quant_type", "blocksize", "dtype", "shape"} - set(meta)
        if missing:
            raise InputError(f"{where}: quant state JSON lacks {sorted(missing)}")
        quant_type = meta["quant_type"]
        if quant_type not in QUANT_TYPES or state_keys[0] != STATE_KEY_PREFIX + quant_type:
            raise InputError(
                f"{where}: unknown quantization type {quant_type!r} ({state_keys[0]}); expected one of {QUANT_TYPES}"
            )
        blocksize = int(meta["blocksize"])
        check_blocksize(blocksize)
        if meta["dtype"] not in _DTYPES:
            raise InputError(f"{where}: unsupported original dtype {meta['dtype']!r}; expected one of {list(_DTYPES)}")
        shape = torch.Size(meta["shape"])
        nblocks = -(-math.prod(shape) // blocksize)
        nested_json = "nested_offset" in meta

        def tensor(key: str, dtype: torch.dtype, expected: tuple[int, ...]) -> torch.Tensor:
            if key not in tensors:
                raise InputError(f"{where}.{key} is missing from the checkpoint")
            t = tensors[key]
            if t.dtype != dtype or tuple(t.shape) != expected:
                raise InputError(
                    f"{where}.{key} has dtype {t.dtype} and shape {tuple(t.shape)}; "
                    f"expected {dtype} and {expected} for a weight of shape {tuple(shape)}"
                )
            return t

        code = tensor("quant_map", torch.float32, (16,))
        nested = None
        if nested_json:
            nested_blocksize = int(meta.get("nested_blocksize", 256))
            absmax = tensor("absmax", torch.uint8, (nblocks,))
            nested = NestedState(
                absmax=tensor("nested_absmax", torch.float32, (-(-nblocks // nested_blocksize),)),
                code=tensor("nested_quant_map", torch.float32, (256,)),
                offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=absmax.device),
                blocksize=nested_blocksize,
            )
        else:
            absmax = tensor("absmax", torch.float32, (nblocks,))
        return cls(quant_type, blocksize, shape, _DTYPES[meta["dtype"]], absmax, code, nested)
