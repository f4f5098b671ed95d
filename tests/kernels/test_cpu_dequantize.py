"""The compiled CPU dequantization kernel (kernels/cpu/dequantize.py) against the plain-torch
reference, the op's choice between it and the table kernel, and a QLoRA step and a serving
thread through it. The suite turns the kernel off elsewhere (tests/conftest.py); here it is on.
Each distinct (size, dtype, double quantization) compiles once per process, so the tests share
two sizes."""

import logging
import threading

import pytest
import torch

from fourbit.errors import InputError
from fourbit.kernels import dequantize_4bit
from fourbit.kernels.cpu import dequantize as compiled
from fourbit.kernels.cpu import native as cpu_native
from fourbit.kernels.dequantize import state_args
from fourbit.quant import dequantize_4bit_reference, quantize_4bit


@pytest.fixture(autouse=True)
def fresh_variants(monkeypatch):
    """Each test starts with the kernel on, no compiled variant claimed and compiling allowed
    (module state, shared by the whole process otherwise). The native kernel, which the op takes
    first, is kept out (tests/kernels/test_cpu_native.py tests it)."""
    monkeypatch.setenv(compiled.ENV, "1")
    monkeypatch.setattr(cpu_native, "supports_dequantize", lambda *args: False)
    compiled._variants.clear()
    compiled._failed = False
    yield
    compiled._variants.clear()
    compiled._failed = False


def direct(packed, state, dtype):
    """The compiled kernel itself, not through the op (which could quietly take the table kernel)."""
    assert compiled.supports(state.numel, state.blocksize, state.nested is not None, dtype)
    out = compiled.dequantize_4bit(packed, *state_args(state), dtype)
    assert out is not None, "compiling failed"
    return out


# Sizes of at least MIN_VALUES (65536) values in whole blocks, odd on each side: 257 x 320 has 1285
# blocks of 64 (1285 = 5 x 256 + 5: a partial last block of the nested absmax codes), 515 x 128
# has 515 blocks of 128. Both output dtypes, with and without double quantization.
@pytest.mark.parametrize("shape,quant_type,blocksize,double_quant,dtype", [
    ((257, 320), "nf4", 64, True, torch.bfloat16),
    ((257, 320), "fp4", 64, False, torch.float32),
    ((515, 128), "nf4", 128, True, torch.float32),
])
def test_compiled_kernel_equals_the_reference_bit_for_bit(shape, quant_type, blocksize, double_quant, dtype):
    # Fresh random weights each run; the same float32 products in the same order as the
    # reference (code value times decoded scale, then the cast), so nothing may differ.
    weight = torch.randn(*shape) * torch.rand(shape[0], 1) * 3
    packed, state = quantize_4bit(weight, quant_type, blocksize, double_quant)
    out = direct(packed, state, dtype)
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out, dequantize_4bit_reference(packed, state, dtype))


def test_the_op_takes_the_compiled_kernel_for_large_weights_and_the_table_for_small_ones():
    big, small = quantize_4bit(torch.randn(257, 320)), quantize_4bit(torch.randn(64, 96))
    for packed, state in (big, small):
        assert torch.equal(dequantize_4bit(packed, state, torch.bfloat16),
                           dequantize_4bit_reference(packed, state, torch.bfloat16))
    assert compiled._variants == {(257 * 320, 64, True, torch.bfloat16)}


def test_float_storage_of_the_packed_bytes_reads_the_same():
    # FSDP keeps the packed bytes in a float tensor; the kernel reads them as bytes.
    packed, state = quantize_4bit(torch.randn(257, 320), "fp4", 64, False)
    assert torch.equal(direct(packed.reshape(-1).view(torch.float32), state, torch.float32),
                       dequantize_4bit_reference(packed, state, torch.float32))


def test_a_qlora_step_through_it_equals_one_through_the_table_kernel(monkeypatch):
    # The fused QLoRA node (kernels/lora.py) dequantizes in forward and again in backward, under
    # grad mode and not: the same values as the table kernel, so the same outputs and gradients.
    from fourbit.nn.linear4bit import Linear4bit
    from fourbit.nn.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(Linear4bit.from_linear(torch.nn.Linear(320, 257), compute_dtype=torch.bfloat16))
    layer.add_adapter(r=8, alpha=16)
    torch.nn.init.normal_(layer.adapter("default").lora_B.weight, std=0.02)
    x = torch.randn(2, 5, 320)
    # the native 4-bit matmul would take these 10 rows' forward product without dequantizing
    monkeypatch.setattr(cpu_native, "max_rows", lambda dtype: 0)
    # and the rank-r products would go to low_rank.c, which sums in another order (its own tests)
    monkeypatch.setattr(cpu_native, "supports_low_rank", lambda *tensors: False)

    def step():
        layer.zero_grad()
        xs = x.clone().requires_grad_()
        out = layer(xs)
        out.float().square().sum().backward()
        return out, xs.grad, [p.grad.clone() for p in layer.parameters() if p.requires_grad]

    with_kernel = step()
    assert compiled._variants == {(257 * 320, 64, True, torch.bfloat16)}  # the layer went through it
    monkeypatch.setenv(compiled.ENV, "0")
    without = step()
    assert torch.equal(with_kernel[0], without[0]) and torch.equal(with_kernel[1], without[1])
    assert all(torch.equal(a, b) for a, b in zip(with_kernel[2], without[2]))


def test_a_thread_that_is_not_the_main_one_compiles_and_runs_it():
    # The serving engine computes on its own thread; its first product may be the first compile
    # (a variant no other test here compiles).
    packed, state = quantize_4bit(torch.randn(515, 128), "nf4", 128, True)
    results = []
    worker = threading.Thread(target=lambda: results.append(dequantize_4bit(packed, state, torch.bfloat16)))
    worker.start()
    worker.join()
    assert compiled._variants == {(515 * 128, 128, True, torch.bfloat16)}
    assert torch.equal(results[0], dequantize_4bit_reference(packed, state, torch.bfloat16))


def test_variants_beyond_the_limit_take_the_table_kernel(monkeypatch):
    monkeypatch.setattr(compiled, "MAX_VARIANTS", 1)
    assert compiled.supports(1 << 16, 64, True, torch.float32)
    assert compiled.supports(1 << 16, 64, True, torch.float32)  # the same variant again
    assert not compiled.supports(1 << 17, 64, True, torch.float32)


def test_weights_it_does_not_support():
    assert not compiled.supports(compiled.MIN_VALUES - 64, 64, True, torch.float32)  # small
    assert not compiled.supports(compiled.MIN_VALUES + 32, 64, True, torch.float32)  # a partial last block


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(compiled.ENV, "0")
    assert not compiled.supports(1 << 16, 64, True, torch.float32)
    monkeypatch.setenv(compiled.ENV, "yes")
    with pytest.raises(InputError, match="FOURBIT_CPU_COMPILE='yes': expected 1 .* or 0"):
        compiled.supports(1 << 16, 64, True, torch.float32)


def test_a_failed_compile_is_logged_once_and_the_table_kernel_takes_over(monkeypatch, caplog):
    def broken():
        def fail(*args):
            raise RuntimeError("no C++ compiler found\ndetails")
        return fail

    monkeypatch.setattr(compiled, "_compiled", broken)
    packed, state = quantize_4bit(torch.randn(256, 512))
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        out = dequantize_4bit(packed, state, torch.float32)
        again = dequantize_4bit(packed, state, torch.float32)
    assert torch.equal(out, dequantize_4bit_reference(packed, state, torch.float32)) and torch.equal(out, again)
    assert [r.getMessage() for r in caplog.records] == [
        "fourbit: compiling the CPU dequantization kernel failed (RuntimeError: no C++ compiler found); "
        "using the uncompiled kernel from now on"]
    assert not compiled.enabled()
