"""The CPU product with a prepacked weight against a float64 product of the same numbers, and
Linear4bit inside dense_weights() (which prepacks its copies) against its dequantizing path."""

import pytest
import torch

from fourbit.kernels.prepacked_linear import is_prepacked, prepack, prepacked_linear
from fourbit.nn import Linear4bit
from fourbit.nn.linear4bit import dense_weights

NATIVE_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 576), (16, 576), (3, 5, 576)])
def test_the_product_with_a_prepacked_weight_is_the_float64_product_up_to_rounding(dtype, shape):
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 576, generator=generator).to(dtype)
    bias = torch.randn(1536, generator=generator).to(dtype)
    x = torch.randn(*shape, generator=generator).to(dtype)
    packed = prepack(w)
    # float32 is prepacked wherever oneDNN runs; bf16 only with native bf16 (else F.linear, unpacked)
    assert is_prepacked(packed) == (dtype == torch.float32 or NATIVE_BF16)
    got = prepacked_linear(x, packed, bias).double()
    want = x.double() @ w.double().T + bias.double()
    # float32: sums of 576 products, each rounded (~sqrt(576) ulps of the terms' size); bf16:
    # the output is rounded to an 8-bit mantissa (2^-8 relative) after a float32 accumulation
    scale = (x.double().abs() @ w.double().abs().T).max()
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    assert (got - want).abs().max() <= tolerance * scale
    x_strided = torch.randn(shape[-1], 4, generator=generator).to(dtype).T  # not contiguous
    assert torch.allclose(prepacked_linear(x_strided, packed).double(), x_strided.double() @ w.double().T,
                          atol=tolerance * scale)


def test_other_devices_and_dtypes_keep_their_weight():
    w = torch.randn(8, 16, dtype=torch.float16)
    assert prepack(w) is w and not is_prepacked(w)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_a_4bit_layer_in_dense_weights_computes_as_outside_and_still_gives_dl_dx(compute_dtype):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(576, 1536), compute_dtype=compute_dtype)
    x = torch.randn(4, 576)
    with torch.no_grad():
        outside = layer(x)
        with dense_weights(layer):
            inside = layer(x)
            assert layer.dense_copy is not None
    # the same dequantized weight; only the products' summation order may differ (oneDNN's
    # blocked kernel against the dequantizing path's matmul): float32 sums of 576 terms in
    # another order (about sqrt(576) ulps of the terms' magnitude; 2x that allowed), then one
    # rounding of the output to the compute dtype each
    terms = x.abs() @ layer.dequantize(torch.float32).abs().T
    bound = 2 * torch.finfo(compute_dtype).eps * outside.abs() + 48 * torch.finfo(torch.float32).eps * terms
    assert ((inside - outside).abs() <= bound).all()
    with dense_weights(layer):  # a product that wants dL/dx takes the dequantizing path
        x.requires_grad_(True)
        layer(x).sum().backward()
    want = layer.dequantize(torch.float64).sum(0)  # d(sum y)/dx = the column sums of W
    assert torch.allclose(x.grad.double(), want.expand_as(x), rtol=1e-2 if compute_dtype == torch.bfloat16 else 1e-5,
                          atol=1e-2 if compute_dtype == torch.bfloat16 else 1e-5)
