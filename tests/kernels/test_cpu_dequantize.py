"""The compiled CPU dequantization kernel (kernels/cpu/dequantize.py) against the plain-torch
reference, and the op's choice between it and the table kernel."""

import logging

import pytest
import torch

from fourbit.errors import InputError
from fourbit.kernels import dequantize_4bit
from fourbit.kernels.cpu import dequantize as compiled
from fourbit.kernels.dequantize import state_args
from fourbit.quant import dequantize_4bit_reference, quantize_4bit


@pytest.fixture(autouse=True)
def fresh_variants():
    """Each test starts with no compiled variant claimed and compiling allowed (module state,
    shared by the whole process otherwise)."""
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
# has 515 blocks of 128.
@pytest.mark.parametrize("shape,quant_type,blocksize,double_quant", [
    ((257, 320), "nf4", 64, True),
    ((257, 320), "fp4", 64, False),
    ((515, 128), "nf4", 128, True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_equals_the_reference_bit_for_bit(shape, quant_type, blocksize, double_quant, dtype):
    # Fresh random weights each run; the same float32 products in the same order as the
    # reference (code value times decoded scale, then the cast), so nothing may differ.
    weight = torch.randn(*shape) * torch.rand(shape[0], 1) * 3
    packed, state = quantize_4bit(weight, quant_type, blocksize, double_quant)
    out = direct(packed, state, dtype)
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out, dequantize_4bit_reference(packed, state, dtype))


def test_the_op_takes_the_compiled_kernel_for_large_weights_and_the_table_for_small_ones():
    big, small = quantize_4bit(torch.randn(256, 512)), quantize_4bit(torch.randn(64, 96))
    for packed, state in (big, small):
        assert torch.equal(dequantize_4bit(packed, state, torch.bfloat16),
                           dequantize_4bit_reference(packed, state, torch.bfloat16))
    assert compiled._variants == {(256 * 512, 64, True, torch.bfloat16)}


def test_float_storage_of_the_packed_bytes_reads_the_same():
    # FSDP keeps the packed bytes in a float tensor; the kernel reads them as bytes.
    packed, state = quantize_4bit(torch.randn(256, 512))
    assert torch.equal(direct(packed.reshape(-1).view(torch.float32), state, torch.float32),
                       dequantize_4bit_reference(packed, state, torch.float32))


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
