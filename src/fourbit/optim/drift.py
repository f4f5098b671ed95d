"""How far 8-bit AdamW's parameters can drift from 32-bit AdamW's: a bound from the maps' resolution.

Resolution. Quantizing x to the nearest level of a map scaled by its block's absmax A errs by
at most delta * A, where delta = the map's largest distance from a point of its domain
([-1, 1] signed, [0, 1] unsigned) to the nearest level: half the widest gap, or the distance
from a domain end to the extreme level. For bitsandbytes' dynamic maps (``map_resolution``):

    delta_s = 0.0070313   signed map (m): widest gaps are in the top decade, 0.9/64 wide;
                          -1 is not a level, -0.99297 is, which is the same distance
    delta_u = 0.0035157   unsigned map (v): twice the levels per decade, 0.9/128 wide

This is an absolute error relative to the block's largest value; relative to an element's own
value it is larger for small elements (the map is float-like, fewer levels per decade lower
down), which is why the bound below needs a premise that keeps v away from 0.

Premise (the "small problem" the bound is about): the gradients do not depend on the
parameters (both optimizers see the same sequence g_1..g_N), and every gradient element
satisfies g_min <= |g| <= g_max. Write b1, b2 for the betas, c1 = 1 - b1^t, c2 = sqrt(1 - b2^t),
kappa = g_max / g_min. 32-bit AdamW's states are m_t, v_t; the 8-bit optimizer's float32
states before requantization are m~_t = b1 * Q(m~_{t-1}) + (1 - b1) g_t, same for v~.

1. Size of the states. |Q(x)| <= absmax(x) because every level is in [-1, 1], so by induction
   |m~_t| <= (1 - b1^t) g_max and 0 <= v~_t <= (1 - b2^t) g_max^2, and likewise for m_t, v_t.
   Also v_t >= (1 - b2^t) g_min^2, i.e. sqrt(v_t)/c2 >= g_min.
2. State error. e_t = m~_t - m_t = b1 (e_{t-1} + q_{t-1}) with the stored rounding
   |q_s| <= delta_s * (1 - b1^s) g_max, and e_1 = 0 (the state starts as exact zeros), so

       |m~_t - m_t| <= delta_s g_max E1(t),      E1(t) = sum_{s=1}^{t-1} b1^(t-s) (1 - b1^s)
       |v~_t - v_t| <= delta_u g_max^2 E2(t),    E2(t) = sum_{s=1}^{t-1} b2^(t-s) (1 - b2^s)

   (worst case: every rounding error with the same sign; real ones mostly cancel).
3. Update error. With D = sqrt(v)/c2 + eps the update is u = m / (c1 D), and
       u~ - u = (m~ - m) / (c1 D~) + (m / (c1 D)) (D - D~) / D~,
   |m| / (c1 D) <= kappa (step 1), |D - D~| = |v - v~| / (c2 (sqrt(v) + sqrt(v~))), and
   v~_t >= v_lo = max((1 - b2) g_min^2, c2^2 g_min^2 - |v~_t - v_t|max), so per step

       |u~_t - u_t| <= b_t = [ delta_s g_max E1 / c1
                               + kappa delta_u g_max^2 E2 / (c2 (c2 g_min + sqrt(v_lo))) ] / (sqrt(v_lo)/c2 + eps)

4. Parameters. Both apply p <- (1 - lr wd) p - lr u, so the difference d_t obeys
   d_t = (1 - lr wd) d_{t-1} - lr (u~_t - u_t) and, as 0 <= 1 - lr wd <= 1,

       |p8_N - p32_N| <= lr * sum_{t=1}^N b_t          (b_1 = 0: step 1 is exact)

   elementwise, plus float32 rounding: each optimizer's own rounding, a few ulps of p per step.
   For b = (0.9, 0.999), kappa = 2: b_t = 0.014, 0.12, 0.24, 0.62 at t = 2, 10, 20, 50. m's
   part levels off (b1 forgets within ~10 steps); v's part keeps growing, since b2 = 0.999
   remembers every rounding of v for ~1000 steps and the worst case adds them all up. Summed:
   |p8 - p32| <= 2.5 lr after 20 steps and 15.4 lr after 50, against kappa * N * lr = 100 lr,
   the most 32-bit AdamW itself can move a parameter in 50 steps. It is a worst case; the
   test measures about 1/25 of it (rounding errors mostly cancel).

What the bound leaves out: parameter-dependent gradients (a loss's gradient feeds the drift
back: d changes g, which changes both states; tests check that case by the loss reached
instead), gradients near 0 (v~ can then round to 0 and the update is m / eps), and
correlations: real rounding errors nearly cancel, so measured drift is far below the bound.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from ..quant.dtypes import dynamic_map


def map_resolution(code: torch.Tensor, signed: bool) -> float:
    """Largest |x - nearest level| over the map's domain, as a fraction of absmax."""
    levels = code.double().sort().values
    half_gaps = (levels[1:] - levels[:-1]) / 2
    low = -1.0 if signed else 0.0
    ends = torch.stack([levels[0] - low, 1.0 - levels[-1]])
    return max(half_gaps.max().item(), ends.abs().max().item())


DELTA_SIGNED = map_resolution(dynamic_map(signed=True), signed=True)
DELTA_UNSIGNED = map_resolution(dynamic_map(signed=False), signed=False)


def per_step_bound(
    t: int, betas: tuple[float, float], eps: float, g_min: float, g_max: float,
    delta_signed: float = DELTA_SIGNED, delta_unsigned: float = DELTA_UNSIGNED,
) -> float:
    """b_t of the module docstring: the most |u~_t - u_t| can be at step t under the premise.

    ``delta_signed``/``delta_unsigned`` are the quantizer's worst error as a fraction of absmax
    (the nearest-level resolution by default; a quantizer that is not exactly nearest has more).
    """
    beta1, beta2 = betas
    if t <= 1:
        return 0.0
    e1 = sum(beta1 ** (t - s) * (1 - beta1**s) for s in range(1, t))
    e2 = sum(beta2 ** (t - s) * (1 - beta2**s) for s in range(1, t))
    c1, c2 = 1 - beta1**t, math.sqrt(1 - beta2**t)
    kappa = g_max / g_min
    v_error = delta_unsigned * g_max**2 * e2
    v_lo = max((1 - beta2) * g_min**2, c2**2 * g_min**2 - v_error)
    denominator = math.sqrt(v_lo) / c2 + eps
    m_part = delta_signed * g_max * e1 / c1
    v_part = kappa * v_error / (c2 * (c2 * g_min + math.sqrt(v_lo)))
    return (m_part + v_part) / denominator


def drift_bound(
    steps: int, lr: float, betas: tuple[float, float], eps: float, g_min: float, g_max: float,
    delta_signed: float = DELTA_SIGNED, delta_unsigned: float = DELTA_UNSIGNED,
) -> float:
    """Most |p8 - p32| can be after ``steps`` steps (module docstring, step 4), float32 rounding aside."""
    if not 0 < g_min <= g_max:
        raise InputError(f"need 0 < g_min <= g_max, got g_min={g_min!r}, g_max={g_max!r}")
    deltas = dict(delta_signed=delta_signed, delta_unsigned=delta_unsigned)
    return lr * sum(per_step_bound(t, betas, eps, g_min, g_max, **deltas) for t in range(1, steps + 1))
