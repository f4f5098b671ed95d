"""The code tables against their published constants (docs/formats.md §1) and definitions."""

import bitsandbytes.functional as F  # test-only peer, the reference for byte compatibility
import pytest
import torch

from fourbit.quant import dtypes

# bitsandbytes' NF4 table as printed in its source, typed here independently of fourbit.
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# FP4 raw magnitudes by bit pattern 0b000..0b111 (docs/formats.md §1), normalized by 12.
FP4_RAW = [0, 0.0625, 8, 12, 4, 6, 2, 3]


def test_nf4_matches_published_constants_exactly():
    assert dtypes.NF4.dtype == torch.float32
    assert torch.equal(dtypes.NF4, torch.tensor(NF4_PUBLISHED, dtype=torch.float32))


def test_nf4_derivation_from_normal_quantiles_reproduces_the_table():
    derived = dtypes.normal_float_map()
    # The published constants were computed once with scipy's norm.ppf; torch's ndtri agrees
    # to a few float32 ulps (measured max 1.2e-7 = 2 ulps near 1.0), well below the smallest
    # gap between NF4 levels (0.08), so the derivation defines the same grid.
    torch.testing.assert_close(derived, dtypes.NF4, rtol=0, atol=2.5e-7)
    assert derived[7] == 0 and (derived > 0).sum() == 8 and (derived < 0).sum() == 7
    assert torch.all(derived[1:] > derived[:-1])


def test_nf4_levels_split_normal_mass_evenly():
    # Independent check of the definition: between consecutive positive levels (scaled back to
    # quantile units) lies an equal share of the normal distribution's mass.
    normal = torch.distributions.Normal(0.0, 1.0)
    top = normal.icdf(torch.tensor(dtypes.NF4_OFFSET, dtype=torch.float64))
    positive = dtypes.NF4[8:].double() * top
    cdf = normal.cdf(positive)
    gaps = cdf[1:] - cdf[:-1]
    torch.testing.assert_close(gaps, gaps.mean().expand_as(gaps), rtol=1e-5, atol=0)


def test_fp4_table_in_bit_pattern_order():
    magnitudes = torch.tensor(FP4_RAW, dtype=torch.float32) / 12
    assert torch.equal(dtypes.FP4[:8], magnitudes)
    assert torch.equal(dtypes.FP4[8:], -magnitudes)
    assert torch.signbit(dtypes.FP4[8]) and dtypes.FP4[8] == 0  # index 8 is -0


def test_int4_is_symmetric_integer_grid():
    assert torch.equal(dtypes.INT4[:15], torch.arange(-7, 8, dtype=torch.float32) / 7)
    assert dtypes.INT4[15] == 0


def test_dynamic_map_properties():
    signed = dtypes.dynamic_map(signed=True)
    assert signed.shape == (256,) and signed.dtype == torch.float32
    assert torch.all(signed[1:] >= signed[:-1])
    assert signed.max() == 1.0 and (signed == 0).sum() == 1
    assert signed.min().item() == pytest.approx(-0.99296875, abs=1e-7)
    assert signed[signed > 0].min().item() == pytest.approx(5.5e-7, rel=1e-6)
    unsigned = dtypes.dynamic_map(signed=False)
    assert unsigned.min() == 0 and unsigned.max() == 1.0 and torch.all(unsigned[1:] > unsigned[:-1])


def test_dynamic_map_matches_bitsandbytes_exactly():
    assert torch.equal(dtypes.dynamic_map(True), F.create_dynamic_map(signed=True))
    assert torch.equal(dtypes.dynamic_map(False), F.create_dynamic_map(signed=False))


def test_tables_match_bitsandbytes_exactly():
    assert torch.equal(dtypes.NF4, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dtypes.FP4, F.get_4bit_type("fp4", device="cpu"))


def test_unknown_quant_type_is_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown 4-bit quantization type 'nf3'.*nf4.*fp4.*int4"):
        dtypes.get_code("nf3")
