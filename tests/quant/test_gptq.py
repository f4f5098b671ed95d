"""GPTQ and its round-to-nearest baseline, against float64 references.

- The grid: scale and zero against the formulas worked by hand.
- GPTQ against RTN: lower output error on the calibration inputs, same bits and groups.
- GPTQ's lazy batches against the plain column-by-column rule written in float64 here: the
  same codes, up to columns where float32 and float64 round a value on the other side of a
  half-step (a handful of codes in 10^4; the output errors then agree within 1%).
"""

import logging

import pytest
import torch

from fourbit.quant.gptq import Hessian, gptq_quantize
from fourbit.quant.groupwise import grid, quantize_rtn


def calibration(n_tokens, in_features, seed=0):
    """Correlated inputs with a few strong channels, like a transformer's activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=g) / in_features**0.5 + torch.eye(in_features)
    x = torch.randn(n_tokens, in_features, generator=g) @ mix
    x[:, :4] *= 8
    return x


def hessian_of(x, sequences=8):
    h = Hessian(x.shape[1])
    for chunk in x.chunk(sequences):
        h.add(chunk[None])
    return h


def output_error(x, w, wq):
    return ((x.double() @ (w.double() - wq.double()).T).norm() / (x.double() @ w.double().T).norm()).item()


def test_grid_by_hand():
    w = torch.tensor([[-1.0, 0.5, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.2, 0.4, 0.6, 0.8]])
    scale, zero = grid(w, bits=4, sym=False)
    # row 0: lo -1, hi 2 -> scale 3/15, zero round(1/0.2) = 5; row 1 empty -> [-1, 1]: 2/15, zero
    # round(1 / (2/15)) = round(7.4999996 in float32) = 7; row 2: lo 0 (zero kept representable),
    # hi 0.8 -> scale 0.8/15, zero 0
    assert torch.allclose(scale, torch.tensor([0.2, 2 / 15, 0.8 / 15]))
    assert zero.tolist() == [5.0, 7.0, 0.0]
    scale, zero = grid(w, bits=4, sym=True)
    # sym: hi = max(|lo|, hi) = 2 -> range [-2, 2]: scale 4/15, zero 8; row 2: lo 0 stays 0 -> scale 0.8/15
    assert torch.allclose(scale, torch.tensor([4 / 15, 2 / 15, 0.8 / 15])) and zero.tolist() == [8.0] * 3


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_rtn_error_is_at_most_half_a_step(sym, group_size):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q = quantize_rtn(w, 4, group_size, sym)
    # The grid of each (row, group), from groupwise.py's definition in float64: random groups
    # hold both signs, so lo = min w, hi = max w; sym widens the range to +-max|w| with zero 8.
    groups = w.double().reshape(16, -1, 64 if group_size == -1 else group_size)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    scale = (hi - lo) / 15
    zero = torch.full_like(scale, 8) if sym else torch.round(-lo / scale)
    # float32 against float64: a few ulps. The zero point is an integer (round(-lo / scale) lands
    # on a half for none of these weights, so both precisions round it alike).
    torch.testing.assert_close(q.scales.double(), scale, rtol=1e-6, atol=0)
    assert torch.equal(q.zeros.double(), zero)
    step = scale[:, q.g_idx.long()]
    assert ((q.dequantize().double() - w.double()).abs() <= step / 2 + 1e-6).all()  # + float32 rounding of w / scale
    assert q.codes.max() <= 15 and q.scales.shape == (16, 64 // (64 if group_size == -1 else group_size))


@pytest.mark.parametrize("sym,act_order,group_size", [(True, False, 128), (False, False, 128), (True, True, 128),
                                                      (True, False, -1), (False, True, 64)])
def test_gptq_beats_round_to_nearest_on_the_calibration_inputs(sym, act_order, group_size):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    x = calibration(1024, 256)
    quant, _ = gptq_quantize(w, hessian_of(x).H, 4, group_size, sym, act_order)
    rtn = quantize_rtn(w, 4, group_size, sym)
    gptq_error, rtn_error = output_error(x, w, quant.dequantize()), output_error(x, w, rtn.dequantize())
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


def naive_gptq(w, H, bits, group_size, sym, damp=0.01):
    """Column by column in float64, no lazy batches, no act_order: the rule as written."""
    W, H = w.double().clone(), H.double().clone()
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    maxq = 2**bits - 1
    codes = torch.zeros_like(W)
    for j in range(W.shape[1]):
        if j % group_size == 0:
            scale, zero = (t.double() for t in grid(W[:, j : j + group_size], bits, sym))
        q = torch.clamp(torch.round(W[:, j] / scale) + zero, 0, maxq)
        codes[:, j] = q
        err = (W[:, j] - scale * (q - zero)) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return codes


def test_lazy_batches_compute_the_column_by_column_rule():
    torch.manual_seed(1)
    w = torch.randn(48, 384) * 0.05
    x = calibration(2048, 384, seed=1)
    H = hessian_of(x).H
    quant, _ = gptq_quantize(w, H, 4, 128, True, block=128)
    want = naive_gptq(w, H, 4, 128, True)
    differ = (quant.codes.double() != want).float().mean().item()
    assert differ < 2e-3, differ


def test_act_order_stores_codes_in_the_original_column_order():
    torch.manual_seed(2)
    w = torch.randn(32, 128) * 0.05
    x = calibration(512, 128, seed=2)
    quant, _ = gptq_quantize(w, hessian_of(x).H, 4, 32, True, act_order=True)
    assert sorted(torch.bincount(quant.g_idx.long()).tolist()) == [32] * 4
    assert not torch.equal(quant.g_idx, torch.arange(128, dtype=torch.int32) // 32)  # reordered groups
    assert output_error(x, w, quant.dequantize()) < output_error(x, w, quantize_rtn(w, 4, 32).dequantize())


def test_dead_inputs_get_zero_weights():
    w = torch.randn(8, 64)
    x = calibration(256, 64)
    x[:, 5] = 0
    quant, _ = gptq_quantize(w, hessian_of(x).H, 4, 32)
    assert (quant.dequantize()[:, 5] == 0).all()


def test_a_singular_hessian_raises_the_damping_with_a_warning(caplog):
    w = torch.randn(8, 64)
    x = calibration(4, 64)  # 4 tokens: H has rank 4 of 64
    with caplog.at_level(logging.WARNING):
        quant, _ = gptq_quantize(w, hessian_of(x, sequences=1).H, 4, 32, damp=0.0)
    assert "used damp=0.01" in caplog.text and torch.isfinite(quant.dequantize()).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"group_size": 100}, "does not divide the input dimension 256"),
    ({"bits": 5}, "bits must be one of"),
    ({"damp": 1.5}, "damp must be in"),
])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gptq_quantize(torch.randn(4, 256), torch.eye(256), **kwargs)


def test_a_non_finite_hessian_is_refused():
    H = torch.eye(64)
    H[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        gptq_quantize(torch.randn(4, 64), H, 4, 32)
