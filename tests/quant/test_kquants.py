"""K-quant blocks (quant/kquants.py) read back by gguf-py's dequantizers, which follow llama.cpp's
block layouts: a misplaced bit or byte shows as an error of the values' own size.

Bounds on the relative RMS error for Gaussian weights: a 4-bit code over a range of about 5
sigma per 32 values gives steps of ~0.33 sigma, RMS ~0.33/sqrt(12) = 0.095 sigma before the
range search; measured 0.071 (Q4_K), 0.036 (Q5_K), 0.018 (Q6_K). The bounds allow 20%.
"""

import gguf
import numpy as np
import pytest
import torch

from fourbit.quant.kquants import quantize_q4_k, quantize_q5_k, quantize_q6_k

CASES = {  # quantizer, GGML type, bytes per 256 values, relative RMS bound
    "Q4_K": (quantize_q4_k, gguf.GGMLQuantizationType.Q4_K, 144, 0.086),
    "Q5_K": (quantize_q5_k, gguf.GGMLQuantizationType.Q5_K, 176, 0.043),
    "Q6_K": (quantize_q6_k, gguf.GGMLQuantizationType.Q6_K, 210, 0.022),
}


def roundtrip(name: str, x: torch.Tensor) -> torch.Tensor:
    quantize, kind, size, _ = CASES[name]
    blocks = quantize(x)
    assert blocks.dtype == np.uint8 and blocks.shape == (x.shape[0], x.shape[1] // 256 * size)
    return torch.from_numpy(gguf.quants.dequantize(blocks, kind).copy()).reshape(x.shape)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gaussian_weights_come_back_within_the_codes_resolution(name):
    x = torch.randn(16, 1024, generator=torch.Generator().manual_seed(0))
    error = (roundtrip(name, x) - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt()
    assert error < CASES[name][3], error


@pytest.mark.parametrize("name", sorted(CASES))
def test_zero_and_one_signed_blocks_are_represented(name):
    x = torch.zeros(3, 256)
    x[1] = torch.linspace(0.1, 2.0, 256)  # all positive: Q4_K/Q5_K's min cannot rise above 0
    x[2] = -torch.linspace(0.1, 2.0, 256)
    y = roundtrip(name, x)
    assert torch.equal(y[0], x[0])
    # at worst half a 4-bit step over [0, 2]: 2 / 15 / 2 = 0.067 (a min above 0 once gave 0.25)
    assert (y[1:] - x[1:]).abs().max() < 0.07


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_sub_block_keeps_its_own_scale(name):
    # sub-blocks 10x apart in magnitude: the small ones keep their own resolution (their 6-bit
    # scale codes are ~6 against the largest 63: steps of 1/6), not the large ones' steps
    scales = torch.logspace(-1, 0, 16).repeat_interleave(16)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)) * scales
    y = roundtrip(name, x)
    small = slice(0, 32)
    assert ((y[:, small] - x[:, small]).abs().max() / x[:, small].abs().max()) < 0.25
