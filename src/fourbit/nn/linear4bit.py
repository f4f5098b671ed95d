"""Linear4bit: a frozen linear layer whose weight is stored in 4 bits.

    y = x @ dequant(W4)^T + b,      computed in ``compute_dtype``, returned in x's dtype

The packed codes live in ``weight`` (uint8 [(out*in + 1)//2, 1], requires_grad=False) and the
scales in ``quant_state``. The weight is frozen: backward dequantizes it again for dL/dx instead
of keeping a 16-bit copy (FrozenLinear, nn/frozen_linear.py: the QLoRA memory saving); a trainable
bias, if any, gets its gradient too. The forward product goes through
the ``fourbit::matmul_4bit`` op (kernels/matmul_4bit.py), which for a few rows of x (decoding)
reads the packed weight directly (Triton on a GPU, C on a CPU, where it is called without the
dispatcher), on a CPU in float32 for more rows dequantizes inside a product of its own (C, both
directions: ``grad_product``), and otherwise dequantizes, then calls the BLAS.

``state_dict()`` emits bitsandbytes' layout (``weight`` + ``weight.absmax``, ``weight.quant_map``,
... see quant/state.py), and ``load_state_dict`` accepts it, or a dense float weight, which is
then quantized.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import InputError
from ..kernels.cpu import native as cpu_native
from ..kernels.dequantize import dequantize_4bit, state_args
from ..kernels.matmul_4bit import matmul_4bit, matmul_4bit_grad
from ..kernels.prepacked_linear import prepack, prepacked_linear
from ..quant.four_bit import quantize_4bit
from ..quant.state import QuantState
from .frozen_linear import FrozenLinear, frozen_product


@contextlib.contextmanager
def dense_weights(model: nn.Module, dtype: torch.dtype | None = None):
    """Within this block every Linear4bit of ``model`` keeps its dequantized weight.

    For many forwards over the same weights where memory allows it (greedy evaluation on a
    CPU, where dequantizing every layer at every decoded token dominates): the same values,
    computed once instead of once per forward, at the cost of holding the dense model. On a
    CPU the copy is also prepacked for oneDNN once (kernels/prepacked_linear.py), so small products
    (decoding) skip the weight reorder every call would do. Made for torch.no_grad(); a product
    that needs dL/dx dequantizes as usual. The weights are dropped on exit.
    """
    layers = [m for m in model.modules() if isinstance(m, Linear4bit) and m.quant_state is not None]
    try:
        for layer in layers:
            layer.dense_copy = prepack(layer.dequantize(dtype or layer.compute_dtype))
        yield model
    finally:
        for layer in layers:
            layer.dense_copy = None


class Linear4bit(FrozenLinear):
    """A 4-bit frozen replacement for ``nn.Linear``. Build it with :meth:`from_linear`."""

    # The dequantized weight, held only inside dense_weights() (a plain attribute: not a buffer,
    # never saved), prepacked for oneDNN on a CPU; forward uses it instead of dequantizing when the
    # dtypes agree and no gradient for x is wanted.
    dense_copy: torch.Tensor | None = None
    # Set under gradient checkpointing on a CPU (train/recipe.py): a QLoRA product keeps its
    # forward's dequantized weight for backward (kernels/lora.py says why that is cheap there).
    keep_weight_for_backward: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        """An empty layer (weight on ``device``, no state yet) to be filled by
        :meth:`quantize_`, :meth:`load_quantized` or ``load_state_dict``; the bias starts at
        zero (``quantize_`` sets the weight only)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype
        packed_bytes = (in_features * out_features + 1) // 2
        self.weight = nn.Parameter(torch.empty(packed_bytes, 1, dtype=torch.uint8, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.quant_state: QuantState | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> Linear4bit:
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            quant_type, blocksize, double_quant, compute_dtype, device="meta",
        )
        layer.quantize_(linear.weight.detach())
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor, name: str = "weight") -> Linear4bit:
        """Quantize a dense [out, in] weight into this layer, on the weight's device."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise InputError(
                f"{name} has shape {tuple(weight.shape)}; this layer expects {(self.out_features, self.in_features)}"
            )
        packed, state = quantize_4bit(weight, self.quant_type, self.blocksize, self.double_quant, name=name)
        return self.load_quantized(packed, state, name)

    def load_quantized(self, packed: torch.Tensor, state: QuantState, name: str = "weight") -> Linear4bit:
        """Adopt already-packed bytes and their state (e.g. read from a checkpoint)."""
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise InputError(
                f"{name} was quantized with shape {tuple(state.shape)}; "
                f"this layer expects {(self.out_features, self.in_features)}"
            )
        nbytes = packed.numel() * packed.element_size()
        if nbytes != state.packed_shape[0]:
            raise InputError(f"{name} holds {nbytes} bytes of 4-bit codes; shape {tuple(state.shape)} "
                             f"needs {state.packed_shape[0]}")
        self.weight = nn.Parameter(packed.reshape(-1, 1), requires_grad=False)
        self.quant_state = state.to(packed.device)
        self._drop_prepared()  # the previous codes' prepared arguments
        self.quant_type, self.blocksize, self.double_quant = state.quant_type, state.blocksize, state.nested is not None
        return self

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out, in] this layer represents (by default in the original weight's dtype)."""
        return dequantize_4bit(self.weight, self._state(), dtype)

    def stored(self) -> tuple[torch.Tensor, ...]:
        return (self.weight,)

    def product(self, x, bias, stored):
        state = self._state()
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            # decoding: the op's CPU kernel called directly with the arguments it prepared once,
            # sparing the dispatcher's ~20 us and the preparation's ~15 (a compiled graph keeps the
            # op, which it cannot see into)
            native = self._native_weight(stored[0], state)
            if native.takes(x):
                return native.matmul(x, bias)
            if native.trains(x):  # float32, many rows (training): W dequantized inside the product
                return native.linear(x, bias)
            if native.dequantizes(x.dtype):  # more rows (a prompt): dequantize, then F.linear, with the
                # same prepared arguments (matmul_4bit would prepare them anew: 63 -> 71 ms a 39-token prompt)
                return nn.functional.linear(x, native.dequantize(x.dtype), bias)
        return matmul_4bit(x, stored[0], state, bias)

    def grad_product(self, grad, stored):
        return matmul_4bit_grad(grad, stored[0], self._state())

    PREPARED = ("_native", "_native_group")  # the native kernel's prepared arguments (pointers), remade on use

    def __getstate__(self):  # copies and pickles leave them out
        return {key: value for key, value in self.__dict__.items() if key not in self.PREPARED}

    def _drop_prepared(self) -> None:
        for key in self.PREPARED:
            self.__dict__.pop(key, None)

    def decoding_product(self, x: torch.Tensor) -> torch.Tensor | None:
        """``self(x)`` straight through the native kernel with its prepared arguments, or None
        where that path does not apply to this layer (a dense copy in use, hooks, a cast, a
        block layout the kernel does not take): then call the layer. For a decode step
        (serve/decode_step.py), which makes ~200 of these products a token and has checked once
        what holds for all of them (no gradient; ``cpu_native.takes_rows(x)``): the module call
        and the per-call checks around the kernel cost ~10 us each."""
        native = self._decoding_weight(x)
        return native.matmul(x, self.bias) if native is not None else None

    def _decoding_weight(self, x: torch.Tensor) -> cpu_native.Weight4bit | None:
        native = self.decoding_weight(x.dtype)
        return native if native is not None and native.k == x.shape[-1] else None

    def decoding_weight(self, dtype: torch.dtype) -> cpu_native.Weight4bit | None:
        """The native kernel's prepared weight where this layer's call on inputs of ``dtype`` is
        exactly that kernel's product plus the bias (see ``decoding_product``), else None."""
        if (self.dense_copy is not None or self._forward_hooks or self._forward_pre_hooks or self.quant_state is None
                or self.compute_dtype not in (None, dtype)):
            return None
        bias = self.bias
        if bias is not None and bias.dtype != dtype:
            return None
        # (asked ~200 times a decoded token: the parameter read from its dict, not through nn.Module's lookup)
        native = self._native_weight(self._parameters["weight"], self.quant_state)
        return native if native.fits else None

    def _native_weight(self, packed: torch.Tensor, state: QuantState) -> cpu_native.Weight4bit:
        """The native kernel's prepared arguments for these codes and this state, made on first
        use and again whenever either is replaced (a load, a device move)."""
        cached = self.__dict__.get("_native")
        if cached is None or cached[0] is not state or cached[1] != packed.data_ptr():
            cached = self.__dict__["_native"] = (state, packed.data_ptr(),
                                                 cpu_native.Weight4bit(packed, *state_args(state)))
        return cached[2]

    def weight_from(self, stored, dtype):
        return dequantize_4bit(stored[0], self._state(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        given, dtype = x.dtype, self.compute_dtype or x.dtype
        bias = self.bias.to(dtype) if self.bias is not None else None
        if given != dtype:  # (the casts are skipped, not made no-ops: a decoded token has ~200 of these calls)
            x = x.to(dtype)
        dense = self.dense_copy
        if dense is not None and dense.dtype == dtype and not (torch.is_grad_enabled() and x.requires_grad):
            y = prepacked_linear(x, dense, bias)  # inside dense_weights(): no dequantization
        else:
            y = frozen_product(self, x, bias)
        return y if given == dtype else y.to(given)

    def _state(self) -> QuantState:
        if self.quant_state is None:
            raise RuntimeError("this Linear4bit holds no weight yet: call quantize_() or load a checkpoint into it")
        return self.quant_state

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}, blocksize={self.blocksize}{dq}, compute_dtype={self.compute_dtype}"
        )

    # -- device moves and state_dict -------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half() reach the packed bytes (uint8: moved, never cast) and the bias;
        # the quantization state follows the bytes' device and keeps its float32 dtype.
        super()._apply(fn, recurse)
        self._drop_prepared()  # they point into the tensors before the move
        if self.quant_state is not None:
            self.quant_state = self.quant_state.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.quant_state is None:  # an empty shell (a model being loaded): its weight alone
            return
        for key, tensor in self._state().to_dict().items():
            destination[f"{prefix}weight.{key}"] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "weight"
        quant = {k.removeprefix(key + "."): v for k, v in state_dict.items() if k.startswith(key + ".")}
        rest = {k: v for k, v in state_dict.items() if k != key and not k.startswith(key + ".")}
        if key in state_dict:
            try:
                if quant:
                    self.load_quantized(state_dict[key], QuantState.from_dict(quant, where=key), key)
                else:
                    self.quantize_(state_dict[key], key)
            except ValueError as e:
                error_msgs.append(str(e))
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key in state_dict and key in missing_keys:
            missing_keys.remove(key)


def decoding_products(layers: tuple[Linear4bit, ...], x: torch.Tensor) -> list[torch.Tensor] | None:
    """``[layer(x) for layer in layers]`` in one native call (layers that share their input: a
    decoder layer's q, k and v projections), or None where a layer's own call must run (see
    Linear4bit.decoding_product, whose conditions these are). The group's prepared pointers are
    kept on the first layer, remade when any layer's prepared weight is."""
    weights = []
    for layer in layers:
        native = layer._decoding_weight(x)
        if native is None:
            return None
        weights.append(native)
    weights = tuple(weights)
    cached = layers[0].__dict__.get("_native_group")
    if cached is None or cached.weights != weights:  # (Weight4bit compares by identity)
        cached = layers[0].__dict__["_native_group"] = cpu_native.Weight4bitGroup(weights)
    outs = cached.matmul(x)
    for out, layer in zip(outs, layers):
        if layer.bias is not None:
            out += layer.bias
    return outs
