"""One decoding step of a Llama-family model, written out: what transformers' forward computes
for one new token per row, without its per-layer machinery.

On a CPU a decoded token of a small model costs more in overhead than in arithmetic: for
SmolLM2-135M the 4-bit products take ~4 ms of C a token, while transformers' forward around them
(module calls, keyword plumbing, the mask builder, the attention dispatcher, norms of seven ops,
rotary embeddings of a dozen) takes as long again. This step runs the same layers with the same
parameters and the same cache:

    x        embed(tokens)                             [rows, 1, hidden]
    per layer
      h      rms_norm(x) * w_in                       (kernels/rms_norm.py: native on a CPU)
      q,k,v  the layer's q/k/v projections             (4-bit ones in one native call:
                                                        nn/linear4bit.py decoding_products; any
                                                        other layer, dense or LoRA, called)
             (Qwen3: q and k RMS-normalized per head)
             rotated by the model's rotary embedding   (kernels/rotary.py: in place)
      k,v    appended to the layer's cache             (DynamicCache.update, as transformers does)
      a      softmax(q K^T * scale + padding) V        (kernels/decode_attention.py: GQA)
      x      x + o_proj(a)
      x      x + down(act(gate(h)) * up(h)),  h = rms_norm(x) * w_post   (gate and up: one call)
    logits   lm_head(rms_norm(x) * w_final)

Every sum, cast and rounding is the one transformers' modeling code makes (the RMS norm in
float32, cast back, then times its weight), except attention, which the native kernel computes
in float32 and rounds once (in another order of sums); so in float32 the logits agree with its
forward to the last few ulps, and in bf16 they are as close to float32 math as its own
(tests/serve/test_decode_step.py).

Where all seven products of a layer are 4-bit layers the native kernel serves as they are
(Linear4bit.decoding_weight: no dense copy in use, no hook, whole blocks), the layer runs as one
native DecodeLayer (kernels/cpu/decode_layer.c), in two calls on either side of the cache's
append: the same kernels in the same order without a return to Python between them
(bit-identical to the step op by op but for SiLU's exponential). What a layer's DecodeLayer was
built from is checked at every step, so new codes, a hook or a dense copy send that layer back
op by op. SmolLM2-135M in 4 bits, ms a token (bench/bench_decode_step.py): bf16 19.4 through
transformers' forward, 11.9 op by op, 8.6 with the native layers; float32 17.2, 11.4, 8.1.

It covers the architectures whose decoder layer is exactly this (Llama, Mistral and Qwen2
without a sliding window, Qwen3) on a CPU; :meth:`DecodeStep.of` returns None for anything else,
and the callers then use the model's own forward.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.activations import SiLUActivation
from transformers.cache_utils import DynamicLayer

from ..kernels.cpu import native as cpu_native
from ..kernels.decode_attention import decode_attention
from ..kernels.rms_norm import rms_norm
from ..kernels.rotary import rotate_
from ..nn.linear4bit import Linear4bit, decoding_products
from ..nn.rms_norm import NORMS, RMSNorm


def _is_norm(module, norm_class: str) -> bool:
    """The architecture's own norm, or fourbit's RMSNorm that training swaps in for it (the same function)."""
    return type(module).__name__ == norm_class or isinstance(module, RMSNorm)


class DecodeStep:
    """The decode step of one model: ``step(ids, mask, positions, cache)`` -> next-token logits."""

    def __init__(self, model, fuse_layers: bool = True):
        self.model, self.inner = model, model.model
        self.fuse_layers = fuse_layers  # False: every layer op by op (the native layers' twin; the bench's A/B)
        self.layers = list(self.inner.layers)
        self._fused: dict[torch.dtype, list] = {}  # per dtype, per layer: (its parts, their ids, DecodeLayer or None)

    @classmethod
    def of(cls, model, fuse_layers: bool = True) -> DecodeStep | None:
        """The step for ``model``, or None where it does not apply (another architecture, a
        sliding window, a changed module, training mode, not on a CPU): the caller uses
        ``model(...)`` then."""
        config = getattr(model, "config", None)
        norm_class = NORMS.get(getattr(config, "model_type", None))  # the model types the step takes
        inner = getattr(model, "model", None)
        if norm_class is None or inner is None or not hasattr(model, "lm_head"):
            return None
        if model.training or next(model.parameters()).device.type != "cpu":  # (training: dropout, left to transformers)
            return None
        norms = [inner.norm] + [n for layer in inner.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        if not all(_is_norm(n, norm_class) for n in norms):
            return None
        if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
            return None  # (Mistral's window is the config's; Qwen2's and Qwen3's, per layer, below)
        for layer in inner.layers:
            attention = layer.self_attn
            if getattr(attention, "sliding_window", None) is not None:
                return None
            if config.model_type == "qwen3" and not all(_is_norm(n, norm_class) for n in (attention.q_norm, attention.k_norm)):
                return None
        return cls(model, fuse_layers)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
        """Logits [rows, vocabulary] of the token after ``ids`` [rows, 1], placed at ``positions``
        [rows, 1] after the ``cache``'s history; ``mask`` [rows, length] marks each row's real
        tokens (its left padding 0), the new one included. The cache gets the new keys and values."""
        inner = self.inner
        x = inner.embed_tokens(ids)
        rows = ids.shape[0]
        cos, sin = (t.reshape(rows, -1) for t in inner.rotary_emb(x, positions))  # [rows, head_dim]
        padding = None if bool(mask.all()) else mask.to(torch.int64).contiguous()
        native = cpu_native.takes_rows(x)  # the same rows and dtype for every product of the step
        fused = self._fused_layers(x.dtype) if native and self.fuse_layers else [None] * len(self.layers)
        if native:
            cos, sin = cos.contiguous(), sin.contiguous()
        for index, layer in enumerate(self.layers):
            one = fused[index]
            if one is not None:  # the whole layer in two native calls; x (the step's own tensor) advanced in place
                q, k, v = one.layer_in(x, cos, sin)
                keys, values = cache.update(k, v, index)
                one.layer_out(x, q, keys, values, padding)
                continue
            attention = layer.self_attn
            norm, size = layer.input_layernorm, attention.head_dim
            h = rms_norm(x, norm.weight, norm.variance_epsilon)
            q, k, v = _products((attention.q_proj, attention.k_proj, attention.v_proj), h, native)
            q, k, v = q.reshape(rows, -1, size), k.reshape(rows, -1, size), v.reshape(rows, -1, 1, size)  # [rows, heads, ...]
            if hasattr(attention, "q_norm"):
                q = rms_norm(q, attention.q_norm.weight, attention.q_norm.variance_epsilon)
                k = rms_norm(k, attention.k_norm.weight, attention.k_norm.variance_epsilon)
            q, k = rotate_(q, k, cos, sin)
            keys, values = cache.update(k[:, :, None], v, index)
            a = decode_attention(q, keys, values, padding, attention.scaling)
            x = x + _product(attention.o_proj, a.reshape(rows, 1, -1), native)
            norm, mlp = layer.post_attention_layernorm, layer.mlp
            h = rms_norm(x, norm.weight, norm.variance_epsilon)
            gate, up = _products((mlp.gate_proj, mlp.up_proj), h, native)
            x = x + _product(mlp.down_proj, mlp.act_fn(gate) * up, native)
        h = rms_norm(x, inner.norm.weight, inner.norm.variance_epsilon)
        return self.model.lm_head(h)[:, -1]

    def _fused_layers(self, dtype: torch.dtype) -> list[cpu_native.DecodeLayer | None]:
        """Per layer, its native DecodeLayer for ``dtype`` where every product is a 4-bit layer the
        kernel serves as it is (see _fusion_parts), else None; rebuilt for a layer whose parts
        changed since (new codes, a dense copy in use, a hook, a replaced parameter)."""
        built = self._fused.setdefault(dtype, [((), (), None)] * len(self.layers))
        layers = []
        for index, layer in enumerate(self.layers):
            parts = _fusion_parts(layer, dtype)
            _, known, fused = built[index]
            if parts is None:  # (what it was built from let go: it may hold a layer's replaced codes)
                fused, built[index] = None, ((), (), None)
            else:
                ids = tuple(map(id, parts))  # (the parts kept alive below, so an id names one object)
                if ids != known:
                    fused = _decode_layer(layer, dtype)
                    built[index] = (parts, ids, fused)
            layers.append(fused)
        return layers


def _layer_products(layer) -> tuple:
    """A decoder layer's seven products in cpu_native.PRODUCTS' order, from the modules' own dicts."""
    attention, mlp = layer._modules["self_attn"]._modules, layer._modules["mlp"]._modules
    return (attention["q_proj"], attention["k_proj"], attention["v_proj"], attention["o_proj"], mlp["gate_proj"],
            mlp["up_proj"], mlp["down_proj"])


def _fusion_parts(layer, dtype: torch.dtype) -> tuple | None:
    """What a layer's DecodeLayer is made of (compared by identity at every step), or None where a
    product is not a 4-bit layer the native kernel serves as it is (Linear4bit.decoding_weight).
    Submodules and parameters are read from the modules' own dicts: this runs for every layer of
    every decoded token, and nn.Module's attribute lookup would double its cost."""
    attention, mlp = layer._modules["self_attn"]._modules, layer._modules["mlp"]._modules
    parts = []
    for module in _layer_products(layer):
        if type(module) is not Linear4bit:
            return None
        weight = module.decoding_weight(dtype)
        if weight is None:
            return None
        parts += (weight, module._parameters.get("bias"))
    norms = [layer._modules["input_layernorm"], layer._modules["post_attention_layernorm"]]
    if "q_norm" in attention:
        norms += [attention["q_norm"], attention["k_norm"]]
    return (*parts, *(norm._parameters["weight"] for norm in norms), mlp.get("act_fn"))


def _decode_layer(layer, dtype: torch.dtype) -> cpu_native.DecodeLayer | None:
    """The layer as one native DecodeLayer, or None where its parts do not fit one: an activation
    other than SiLU, a norm or bias in another dtype, shapes other than a decoder layer's."""
    attention, mlp = layer.self_attn, layer.mlp
    if type(mlp.act_fn) not in (SiLUActivation, torch.nn.SiLU):
        return None
    modules = dict(zip(cpu_native.PRODUCTS, _layer_products(layer)))
    weights = {name: module.decoding_weight(dtype) for name, module in modules.items()}
    d = attention.head_dim
    hidden, intermediate, heads, kv_heads = weights["o"].n, weights["gate"].n, weights["q"].n // d, weights["k"].n // d
    shapes = {"q": (heads * d, hidden), "k": (kv_heads * d, hidden), "v": (kv_heads * d, hidden),
              "o": (hidden, heads * d), "gate": (intermediate, hidden), "up": (intermediate, hidden),
              "down": (hidden, intermediate)}
    if any((weights[name].n, weights[name].k) != shape for name, shape in shapes.items()) or heads % kv_heads:
        return None
    norms = [(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
             (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)]
    norms += ([(attention.q_norm.weight, attention.q_norm.variance_epsilon),
               (attention.k_norm.weight, attention.k_norm.variance_epsilon)] if hasattr(attention, "q_norm") else [None, None])
    if any(norm is not None and norm[0].dtype != dtype for norm in norms):
        return None
    biases = {name: module.bias for name, module in modules.items()}  # (decoding_weight checked their dtype)
    return cpu_native.DecodeLayer(weights, biases, tuple(norms), heads, kv_heads, d, attention.scaling, dtype)


def _product(layer, x: torch.Tensor, native: bool) -> torch.Tensor:
    """``layer(x)``: a 4-bit layer's product straight through its native kernel where it applies
    (``native``: the kernel takes x's rows and dtype; Linear4bit.decoding_product checks the
    layer), else the layer itself (dense, LoRA, a dense copy in use)."""
    if native and type(layer) is Linear4bit:
        y = layer.decoding_product(x)
        if y is not None:
            return y
    return layer(x)


def _products(layers: tuple, x: torch.Tensor, native: bool) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]``: in one native call where all are 4-bit layers it applies
    to (nn/linear4bit.py decoding_products), else one by one."""
    if native and all(type(layer) is Linear4bit for layer in layers):
        ys = decoding_products(layers, x)
        if ys is not None:
            return ys
    return [_product(layer, x, native) for layer in layers]


def cache_supported(cache: DynamicCache) -> bool:
    """Whether the step can extend ``cache`` (every layer a plain DynamicLayer)."""
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)
