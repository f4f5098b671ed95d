"""q8_blocks (quant/q8_blocks.py): the 8-bit form of a float32 weight that has one, checked against
gguf-py's own Q8_0 blocks (llama.cpp's layout: a float16 scale, then 32 int8 codes), and no form
for a weight that is off its grid by a single value."""

import gguf
import numpy as np
import pytest
import torch

from fourbit.quant import q8_blocks as module
from fourbit.quant.q8_blocks import q8_blocks

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def from_gguf(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gguf-py's Q8_0 of ``weight``: its float32 values (dequantized by gguf-py), and the stored
    codes [n, k] and scales [n, k / 32] read from the block bytes."""
    n, k = weight.shape
    blocks = gguf.quants.quantize(weight.numpy(), Q8_0).reshape(n, k // 32, 34)
    scales = torch.from_numpy(blocks[..., :2].copy().view(np.float16).astype(np.float32)).reshape(n, k // 32)
    codes = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(n, k)
    values = torch.from_numpy(gguf.quants.dequantize(blocks.reshape(n, -1), Q8_0).copy()).reshape(n, k)
    return values, codes, scales


@pytest.mark.parametrize("n,k", [(1, 32), (7, 96), (50, 576)])
def test_a_weight_read_from_q8_0_is_found_with_ggufs_codes_and_scales(n, k):
    torch.manual_seed(n)
    values, codes, scales = from_gguf(torch.randn(n, k) * 0.05)
    form = q8_blocks(values)
    assert form is not None
    assert torch.equal(form[0], codes) and torch.equal(form[1], scales)
    products = (form[0].float().reshape(n, -1, 32) * form[1][..., None]).reshape(n, k)
    assert torch.equal(products, values)  # every value, exactly


def test_rows_are_checked_a_slice_at_a_time(monkeypatch):
    monkeypatch.setattr(module, "ROWS_AT_ONCE", 3)  # 10 rows: slices of 3, 3, 3, 1
    values, codes, scales = from_gguf(torch.randn(10, 64))
    form = q8_blocks(values)
    assert torch.equal(form[0], codes) and torch.equal(form[1], scales)
    values[9, 5] = torch.nextafter(values[9, 5], torch.tensor(10.0))  # the last slice's value off the grid
    assert q8_blocks(values) is None


def test_one_value_off_its_blocks_grid_means_no_form():
    values, _, _ = from_gguf(torch.randn(8, 64))
    for change in (lambda v: torch.nextafter(v, torch.tensor(10.0)), lambda v: v * 1.001, lambda v: v * float("nan")):
        off = values.clone()
        off[3, 40] = change(off[3, 40])
        assert q8_blocks(off) is None


def test_zero_blocks_have_zero_scale():
    values, _, _ = from_gguf(torch.randn(2, 64))
    values[1, 32:] = 0
    codes, scales = q8_blocks(values)
    assert scales[1, 1] == 0 and not codes[1, 32:].any()


def test_no_form_for_other_dtypes_shapes_and_plain_weights():
    assert q8_blocks(torch.randn(4, 64)) is None  # float32 values off any 8-bit grid
    values, _, _ = from_gguf(torch.randn(4, 64))
    assert q8_blocks(values.bfloat16()) is None  # the form is of float32 weights
    assert q8_blocks(values.to(torch.float64)) is None
    assert q8_blocks(values[:, :48]) is None  # k not a multiple of 32
    assert q8_blocks(values.reshape(-1)) is None
