"""The native CPU 4-bit matmul (kernels/cpu/native.c) against float64 math and its plain-torch
twin (dequantize, then F.linear), in each instruction set this CPU can run (its own, AVX2, plain
C), and the op's and Linear4bit's choice of it. The suite turns the run-time-compiled kernels off
elsewhere (tests/conftest.py); here they are on."""

import logging

import pytest
import torch

from fourbit.errors import InputError
from fourbit.kernels import matmul_4bit
from fourbit.kernels.cpu import native
from fourbit.kernels.dequantize import state_args
from fourbit.nn.linear4bit import Linear4bit
from fourbit.quant import dequantize_4bit_reference, quantize_4bit


def state_args_of(weight: torch.Tensor) -> tuple:
    """Weight4bit's arguments for ``weight`` quantized to NF4 (blocks of 64, double quant)."""
    packed, state = quantize_4bit(weight, "nf4", 64, True)
    return (packed, *state_args(state))


# "native" is this machine's own (AVX-512 here, AVX2 on the AVX2-only kind); the explicit ones let
# every machine check the paths it can run
ISAS = native.runnable_isas()


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.setenv(native.ENV, "1")


def direct(x, packed, state, bias=None, isa="native"):
    return native.matmul_4bit(x, packed, *state_args(state), bias, isa=isa)


def reference64(x, packed, state, bias=None):
    w = dequantize_4bit_reference(packed, state, torch.float32).double()
    y = x.double() @ w.T
    return y + bias.double() if bias is not None else y


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def dot_bf16(isa: str) -> bool:
    """Whether this build multiplies bf16 x with vdpbf16ps (weights rounded to bf16 first)."""
    return native.library(isa).fourbit_isa() == b"avx512-bf16"


def reference64_bf16(x, packed, state, bias=None):
    """The twin's function at bf16: the weight dequantized to bf16, products and sums exact."""
    w = dequantize_4bit_reference(packed, state, torch.float32).bfloat16().double()
    y = x.double() @ w.T
    return y + bias.double() if bias is not None else y


# Odd shapes: rows of W not a multiple of the 16-row chunks, K of 1 to 24 blocks; rows of x from
# 1 past the 8 that share a decoded weight; double quantization with a partial last nested block.
SHAPES = [
    (37, 192, 64, "nf4", True),
    (1, 64, 64, "fp4", False),
    (203, 1536, 64, "nf4", True),
    (17, 96, 32, "nf4", False),
    (50, 256, 128, "fp4", True),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k,blocksize,quant_type,double_quant", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 11])
def test_float32_equals_float64_math(isa, n, k, blocksize, quant_type, double_quant, rows):
    packed, state = quantize_4bit(torch.randn(n, k), quant_type, blocksize, double_quant)
    x, bias = torch.randn(rows, k), torch.randn(n)
    y = direct(x, packed, state, bias, isa)
    assert y.dtype == torch.float32 and y.shape == (rows, n) and torch.isfinite(y).all()
    # float32 products summed in float32 over at most 1536 terms: ~1e-7 relative, bound 1e-5
    assert rel(y, reference64(x, packed, state, bias)) < 1e-5


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k,blocksize,quant_type,double_quant", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_bfloat16_equals_float64_math(isa, n, k, blocksize, quant_type, double_quant, rows):
    packed, state = quantize_4bit(torch.randn(n, k), quant_type, blocksize, double_quant)
    x = torch.randn(rows, k).bfloat16()
    y = direct(x, packed, state, isa=isa)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n) and torch.isfinite(y).all()
    # the output rounded to bf16: 2^-9 relative at most per element, about 1e-3 in norm; bound 4e-3
    # (a wrong lane, block or scale is off by order 1). With vdpbf16ps the weights are bf16 too,
    # as the twin's are; otherwise they stay float32.
    expected = reference64_bf16 if dot_bf16(isa) else reference64
    assert rel(y, expected(x, packed, state)) < 4e-3


@pytest.mark.parametrize("isa", [isa for isa in ISAS if isa != "native"] or ["generic"])
def test_bfloat16_out_is_the_float32_result_rounded_to_nearest_even(isa):
    # without vdpbf16ps a bf16 x is widened exactly and the computation is the float32 one, so
    # only the kernel's own rounding of y may differ from torch's: it must not, bit for bit
    packed, state = quantize_4bit(torch.randn(75, 320), "nf4", 64, True)
    x = torch.randn(5, 320).bfloat16()
    assert not dot_bf16(isa)
    assert torch.equal(direct(x, packed, state, isa=isa), direct(x.float(), packed, state, isa=isa).bfloat16())


def test_leading_dimensions_and_the_twin():
    packed, state = quantize_4bit(torch.randn(96, 128), "nf4", 64, True)
    x = torch.randn(2, 3, 128)
    y = direct(x, packed, state)
    assert y.shape == (2, 3, 96)
    twin = torch.nn.functional.linear(x, dequantize_4bit_reference(packed, state, torch.float32))
    assert rel(y, twin) < 1e-5  # both float32, the additions in another order


def test_threads_do_not_change_the_result():
    packed, state = quantize_4bit(torch.randn(300, 576), "nf4", 64, True)
    x = torch.randn(3, 576)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = direct(x, packed, state)
        torch.set_num_threads(2)
        two = direct(x, packed, state)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each output is one thread's, its additions in a fixed order


def test_the_op_takes_it_for_few_rows_only(monkeypatch):
    packed, state = quantize_4bit(torch.randn(40, 128), "nf4", 64, True)
    calls = []
    kernel = native.matmul_4bit
    monkeypatch.setattr(native, "matmul_4bit", lambda *a, **kw: calls.append(a[0].shape) or kernel(*a, **kw))
    for rows in (1, native.MAX_ROWS, native.MAX_ROWS + 1):
        x = torch.randn(rows, 128)
        assert rel(matmul_4bit(x, packed, state), reference64(x, packed, state)) < 1e-5
    assert calls == [(1, 128), (native.MAX_ROWS, 128)]
    limit = native.max_rows(torch.bfloat16)  # 48 where vdpbf16ps serves bf16, else the float32 limit
    assert limit == (native.MAX_ROWS_DOT_BF16 if dot_bf16("native") else native.MAX_ROWS)
    calls.clear()
    for rows in (limit, limit + 1):
        x = torch.randn(rows, 128).bfloat16()
        assert rel(matmul_4bit(x, packed, state), reference64(x, packed, state)) < 4e-3
    assert calls == [(limit, 128)]
    monkeypatch.setenv(native.ENV, "0")
    assert not native.supports(torch.randn(1, 128), 64, 256, 128)


def test_linear4bit_decodes_through_it_and_trains_through_the_twin(monkeypatch):
    torch.manual_seed(0)
    dense = torch.randn(48, 64)
    layer = Linear4bit(64, 48, bias=False, compute_dtype=torch.float32).quantize_(dense)
    calls = []
    kernel = native.Weight4bit.matmul
    monkeypatch.setattr(native.Weight4bit, "matmul", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    x = torch.randn(1, 64, requires_grad=True)
    ref = reference64(x.detach(), layer.weight, layer.quant_state)
    with torch.no_grad():
        assert rel(layer(x), ref) < 1e-5
    y = layer(x)  # forward through the kernel too, backward dequantizes for dL/dx
    y.sum().backward()
    w64 = dequantize_4bit_reference(layer.weight, layer.quant_state, torch.float32).double()
    assert rel(x.grad, w64.sum(0, keepdim=True)) < 1e-6
    assert len(calls) == 2


def test_a_compiler_that_fails_is_said_once_and_the_twin_serves(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("FOURBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_failed", set())
    monkeypatch.setattr(native, "_loaded", {})
    native._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=native.log.name):
            assert native.library("generic") is None
            assert native.library("generic") is None
        assert sum("unavailable" in r.message for r in caplog.records) == 1
        packed, state = quantize_4bit(torch.randn(16, 64), "nf4", 64, True)
        x = torch.randn(1, 64)
        assert not native.supports(x, 64, 256, 64)  # this machine's own build fails the same way
        assert rel(matmul_4bit(x, packed, state), reference64(x, packed, state)) < 1e-5
    finally:
        native._library.cache_clear()


def test_greedy_decoding_from_the_4bit_codes_makes_the_dense_caches_tokens(tiny_llama, chat_tokenizer, monkeypatch):
    # End to end: a 4-bit tiny Llama decoding 12 tokens, one row and three, through the native
    # kernel (every product of a decoding step: rows <= max_rows) and through the dense cache
    # (dequantized float32 weights, oneDNN): float32 both, the sums in another order, so the
    # same greedy tokens (this fixed model has no near-tie among them).
    import fourbit
    from fourbit.nn.linear4bit import dense_weights
    from fourbit.serve import Sampling, generate

    folder, _ = tiny_llama
    model, _ = fourbit.load_model(folder, compute_dtype="float32")
    prompts = [[1, 17, 42, 99, 7], [3, 5, 8, 13, 21, 34, 55], [2, 2, 200]]
    sampling = Sampling(max_new_tokens=12)
    calls = []
    kernel = native.Weight4bit.matmul
    monkeypatch.setattr(native.Weight4bit, "matmul", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    for batch in (prompts[:1], prompts):
        with torch.no_grad():
            ours = [r.token_ids for r in generate(model, chat_tokenizer, batch, sampling, eos_ids=set())]
            assert calls, "the 4-bit path did not reach the native kernel"
            calls.clear()
            with dense_weights(model):
                dense = [r.token_ids for r in generate(model, chat_tokenizer, batch, sampling, eos_ids=set())]
        assert not calls and ours == dense and all(len(ids) == 12 for ids in ours)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape,quant_type,blocksize,double_quant", [
    ((257, 320), "nf4", 64, True),  # 1285 blocks: a partial last nested block
    ((257, 320), "fp4", 64, False),
    ((515, 128), "nf4", 128, True),
    ((3, 32), "nf4", 32, True),
    ((7, 4096), "fp4", 4096, True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantization_is_the_reference_bit_for_bit(isa, shape, quant_type, blocksize, double_quant, dtype):
    # the same float32 roundings as the reference (the scale's two, the product's one; no FMA
    # contraction), then the same rounding to bf16: nothing may differ
    packed, state = quantize_4bit(torch.randn(shape), quant_type, blocksize, double_quant)
    out = native.dequantize_4bit(packed, *state_args(state), dtype, isa=isa)
    assert torch.equal(out, dequantize_4bit_reference(packed, state, dtype))


def test_the_dequantize_op_takes_it_for_whole_blocks(monkeypatch):
    from fourbit.kernels import dequantize_4bit

    calls = []
    kernel = native.dequantize_4bit
    monkeypatch.setattr(native, "dequantize_4bit", lambda *a, **kw: calls.append(a[-1]) or kernel(*a, **kw))
    for shape, dtype in [((40, 64), torch.bfloat16), ((40, 64), torch.float16), ((5, 13), torch.float32)]:
        packed, state = quantize_4bit(torch.randn(shape), "nf4", 64, True)
        assert torch.equal(dequantize_4bit(packed, state, dtype), dequantize_4bit_reference(packed, state, dtype))
    assert calls == [torch.bfloat16]  # float16 out, and 65 values (a partial block), take the other kernels


def test_a_layer_that_decoded_follows_new_codes_and_a_move():
    # Linear4bit keeps the kernel's prepared arguments (pointers into its tensors) between calls:
    # new codes, or a move of the layer, must not leave it reading the old ones
    torch.manual_seed(0)
    layer = Linear4bit(128, 40, bias=False, compute_dtype=torch.float32).quantize_(torch.randn(40, 128))
    x = torch.randn(1, 128)
    with torch.no_grad():
        layer(x)
        layer.quantize_(torch.randn(40, 128))
        assert rel(layer(x), reference64(x, layer.weight, layer.quant_state)) < 1e-5
        layer.to(torch.float16)  # a dtype cast goes through _apply too; the codes stay as stored
        assert rel(layer(x), reference64(x, layer.weight, layer.quant_state)) < 1e-5


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_a_group_computes_each_weights_product_bit_for_bit(isa, dtype, rows):
    # one call and one thread team for weights sharing x (q, k, v): each product is the one the
    # single-weight call makes (the same row kernels over the same permuted x), sizes not a
    # multiple of the 16-row chunks, and more rows of x than one pass takes (40)
    torch.manual_seed(0)
    weights = tuple(native.Weight4bit(*state_args_of(torch.randn(n, 128))) for n in (40, 17, 64))
    x = torch.randn(rows, 128).to(dtype)
    outs = native.Weight4bitGroup(weights).matmul(x, isa=isa)
    assert [tuple(o.shape) for o in outs] == [(rows, 40), (rows, 17), (rows, 64)]
    for out, weight in zip(outs, weights):
        assert out.dtype == dtype and torch.equal(out, weight.matmul(x, None, isa=isa))


def test_a_group_needs_one_input_width():
    a = native.Weight4bit(*state_args_of(torch.randn(16, 64)))
    b = native.Weight4bit(*state_args_of(torch.randn(16, 128)))
    with pytest.raises(InputError, match="same input width"):
        native.Weight4bitGroup((a, b))


def test_layers_decode_together_as_they_do_alone_and_follow_new_codes():
    from fourbit.nn.linear4bit import decoding_products

    torch.manual_seed(0)
    layers = tuple(Linear4bit(128, n, bias=bias, compute_dtype=torch.float32).quantize_(torch.randn(n, 128))
                   for n, bias in ((40, True), (24, False)))
    x = torch.randn(2, 1, 128)
    with torch.no_grad():
        together = decoding_products(layers, x)
        assert all(torch.equal(t, layer(x)) for t, layer in zip(together, layers))  # biases added as the layer adds them
        layers[1].quantize_(torch.randn(24, 128))  # new codes: the group's pointers are remade
        assert torch.equal(decoding_products(layers, x)[1], layers[1](x))
        layers[0].register_forward_hook(lambda *args: None)  # one layer's own call must run: no group
        assert decoding_products(layers, x) is None


# The dense products (matmul_dense): K not a multiple of any vector width (16 and 32 lanes, 64
# for the two chains), rows of x past the 8 that share each load of W.
DENSE_SHAPES = [(37, 576), (5, 37), (130, 100), (64, 1536)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k", DENSE_SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 8, 11])
def test_dense_float32_equals_float64_math(isa, n, k, rows):
    w, x, bias = torch.randn(n, k), torch.randn(rows, k), torch.randn(n)
    y = native.matmul_dense(x, w, bias, isa=isa)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    # float32 products summed in float32 over at most 1536 terms: ~1e-7 relative, bound 1e-5
    assert rel(y, x.double() @ w.double().T + bias.double()) < 1e-5


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k", DENSE_SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_dense_bfloat16_equals_float64_math(isa, n, k, rows):
    w, x = torch.randn(n, k).bfloat16(), torch.randn(rows, k).bfloat16()
    y = native.matmul_dense(x.reshape(rows, 1, k), w, isa=isa)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 1, n)
    # bf16 operands multiplied exactly (bf16 x bf16 fits float32), sums float32, the output
    # rounded to bf16: 2^-9 relative per element, about 1e-3 in norm; bound 4e-3
    assert rel(y.reshape(rows, n), x.double() @ w.double().T) < 4e-3


@pytest.mark.parametrize("isa", [isa for isa in ISAS if isa != "native"] or ["generic"])
def test_dense_bfloat16_out_is_the_float32_result_rounded_to_nearest_even(isa):
    # without vdpbf16ps the bf16 operands are widened exactly: only the final rounding of y may
    # differ from torch's, and it must not
    w, x = torch.randn(75, 333).bfloat16(), torch.randn(5, 333).bfloat16()
    assert torch.equal(native.matmul_dense(x, w, isa=isa), native.matmul_dense(x.float(), w.float(), isa=isa).bfloat16())


def q8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float32 weight [n, k] that is int8 codes times a scale per 32, and the two."""
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scales = torch.rand(n, k // 32) * 0.01
    scales[0, 0] = 0  # an all-zero block's scale
    w = (codes.float().reshape(n, -1, 32) * scales[..., None]).reshape(n, k)
    return w, codes, scales


Q8_SHAPES = [(37, 576), (5, 32), (130, 96), (64, 1536)]  # k: whole blocks of 32, odd multiples of 16 and 32


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k", Q8_SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 8, 11])
def test_q8_is_bit_identical_to_the_dense_product_of_its_weight(isa, n, k, rows):
    w, codes, scales = q8_weight(n, k)
    x, bias = torch.randn(rows, 1, k), torch.randn(n)
    y = native.matmul_q8(x, codes, scales, bias, isa=isa)
    assert y.shape == (rows, 1, n) and y.dtype == torch.float32
    # each weight formed as float32(code) * scale, then the dense kernel's FMAs in its order
    assert torch.equal(y, native.matmul_dense(x, w, bias, isa=isa))
    # and so float32 sums of exact products: ~1e-7 relative, bound 1e-5 (as the dense kernel's)
    assert rel(y.reshape(rows, n), x.reshape(rows, k).double() @ w.double().T + bias.double()) < 1e-5


def test_q8_rejects_what_is_not_its_form():
    w, codes, scales = q8_weight(4, 64)
    x = torch.randn(1, 64)
    with pytest.raises(InputError, match="int8 codes"):
        native.matmul_q8(x, codes.to(torch.int16), scales)
    with pytest.raises(InputError, match="float32 scales"):
        native.matmul_q8(x, codes, scales[:, :1])
    with pytest.raises(InputError, match="float32 x"):
        native.matmul_q8(x.bfloat16(), codes, scales)


def test_dense_products_are_taken_for_few_rows_of_one_dtype():
    w = torch.randn(16, 64)
    assert native.supports_dense(torch.randn(native.MAX_ROWS_DENSE, 64), w)
    assert not native.supports_dense(torch.randn(native.MAX_ROWS_DENSE + 1, 64), w)
    assert not native.supports_dense(torch.randn(1, 64).bfloat16(), w)  # dtypes differ: F.linear's promotion error
    assert not native.supports_dense(torch.randn(1, 64).half(), w.half())
    assert not native.supports_dense(torch.randn(1, 32), w)


def test_a_layer_that_decoded_can_be_copied_and_pickled():
    # the kernel's prepared arguments hold raw pointers (ctypes), which neither copy.deepcopy nor
    # pickle can take; the copies leave them out and make their own on first use
    import copy
    import io

    torch.manual_seed(0)
    layer = Linear4bit(128, 40, bias=False, compute_dtype=torch.float32).quantize_(torch.randn(40, 128))
    x = torch.randn(1, 128)
    with torch.no_grad():
        y = layer(x)
        twin = copy.deepcopy(layer)
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(twin(x), y) and torch.equal(loaded(x), y)
