"""AdamW with 32-bit or block-wise 8-bit state, optionally paged to host memory.

Decoupled-weight-decay Adam (Loshchilov & Hutter), exactly as ``torch.optim.AdamW`` with
amsgrad=False, maximize=False. For each parameter p with gradient g, at step t = 1, 2, ...:

    p <- p * (1 - lr * wd)                                  decay first, the parameter only
    m <- m + (1 - b1) * (g - m)                             = b1*m + (1-b1)*g   (torch's lerp_)
    v <- b2 * v + (1 - b2) * g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

with m = v = 0 before step 1. The float32 operations are torch's single-tensor AdamW's, in
its order (the path torch takes for CPU tensors), so on CPU a float32 parameter follows
``torch.optim.AdamW`` bit for bit; torch's foreach/fused paths (its CUDA default) group and
fuse the same formulas and differ from it by float32 rounding, a few ulps per step.
Half-precision parameters are updated in float32 and rounded back once per step; the states
are always float32 (where torch keeps them in the parameter's dtype).

8-bit state (``optim_bits=8``, bitsandbytes' block-wise 8-bit Adam). m and v are stored as one
byte per element plus one float32 per block of ``blocksize`` (256) elements:

    m ~ signed_dynamic_map[codes_m] * absmax_m[block]       (codes into the SIGNED map)
    v ~ unsigned_dynamic_map[codes_v] * absmax_v[block]     (v >= 0: the UNSIGNED map)

Each step dequantizes both, runs the float32 update above on them, then requantizes the new
m and v with a fresh absmax per block (nearest code; see quant/blockwise.py). The update of
the parameter uses the float32 states before requantization, so step 1 equals 32-bit AdamW
exactly and later steps differ only through the stored states' rounding. Parameters with
fewer than ``min_8bit_size`` (4096) elements keep float32 states: their states are small and
the relative cost of rounding them is not worth it. State is ~2 bytes per element instead of 8.

How far the 8-bit optimizer's parameters can drift from 32-bit AdamW's is derived in
``drift.py``: after N steps at most lr * sum_t b_t, where b_t grows with the dynamic maps'
resolution (half their largest gap: 0.0070 of absmax for m, 0.0035 for v).

Paged state (``paged=True``): state tensors of >= ``page_min_numel`` elements live in host
memory and are copied to the parameter's device for its update and back (``paged.py``).
Copies change no value: a paged optimizer's results equal the unpaged one's bit for bit.

State layout per parameter (what ``state_dict`` holds): ``step`` (int) and either
``exp_avg``/``exp_avg_sq`` (float32, the parameter's shape) or ``exp_avg_codes``/
``exp_avg_sq_codes`` (uint8, flat) with ``exp_avg_absmax``/``exp_avg_sq_absmax`` (float32,
one per block). ``load_state_dict`` keeps these dtypes (torch's would cast the uint8 codes to
the parameter's dtype) and puts each tensor where this optimizer keeps it, so a resumed run
continues bit-identically.

Not handled: sparse gradients (refused), amsgrad, maximize, complex parameters, gradient
NaN/Inf skipping (a NaN gradient poisons its 8-bit block, as it poisons torch's state).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import InputError
from ..quant.blockwise import BLOCKSIZES, dequantize_blockwise, quantize_blockwise
from ..quant.dtypes import dynamic_map
from .paged import PAGE_MIN_NUMEL, Pager

OPTIM_BITS = (8, 32)
STATE_DTYPES = {  # the dtype each state tensor is kept in, whatever a loaded checkpoint holds
    "exp_avg": torch.float32,
    "exp_avg_sq": torch.float32,
    "exp_avg_codes": torch.uint8,
    "exp_avg_sq_codes": torch.uint8,
    "exp_avg_absmax": torch.float32,
    "exp_avg_sq_absmax": torch.float32,
}


def check_hyperparameters(group: dict) -> None:
    """Refuse values outside AdamW's domain, naming the argument and the allowed range."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        raise InputError(f"lr: learning rate must be a Python number (tensor lr is not supported), got {lr!r}")
    if not lr >= 0:  # `not >=` also refuses NaN; 0 is where schedules begin (warm-up) and end (cosine, linear)
        raise InputError(f"lr: learning rate must be >= 0, got {lr!r}")
    betas = group["betas"]
    if len(betas) != 2:
        raise InputError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise InputError(f"betas[{i}] must be in [0, 1), got {beta!r}")
    if not group["eps"] >= 0.0:
        raise InputError(f"eps must be >= 0, got {group['eps']!r}")
    if not group["weight_decay"] >= 0.0:
        raise InputError(f"weight_decay must be >= 0, got {group['weight_decay']!r}")
    if group["optim_bits"] not in OPTIM_BITS:
        raise InputError(f"optim_bits must be one of {OPTIM_BITS}, got {group['optim_bits']!r}")
    if group["blocksize"] not in BLOCKSIZES:
        raise InputError(f"blocksize must be one of {BLOCKSIZES}, got {group['blocksize']!r}")
    size = group["min_8bit_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InputError(f"min_8bit_size must be an int >= 0, got {size!r}")


def adam_update(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay) -> None:
    """One AdamW step in place on float32 tensors: torch's single-tensor ops in torch's order."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = float(step)  # torch reads its step counter as a Python float
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class AdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` with optional 8-bit block-wise state and paging (see module docstring).

    ``optim_bits``, ``min_8bit_size`` and ``blocksize`` are per-group settings (they say how the
    state is encoded and travel with ``state_dict``); ``paged`` and ``page_min_numel`` say where
    the state is kept and belong to this optimizer, so a checkpoint written paged loads unpaged.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        optim_bits: int = 32,
        paged: bool = False,
        min_8bit_size: int = 4096,
        blocksize: int = 256,
        page_min_numel: int = PAGE_MIN_NUMEL,
    ):
        if not isinstance(paged, bool):
            raise InputError(f"paged must be True or False, got {paged!r}")
        self.paged = paged
        pager = Pager(page_min_numel)  # checks page_min_numel even when unpaged
        self.pager = pager if paged else Pager(None)
        self._maps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            optim_bits=optim_bits, min_8bit_size=min_8bit_size, blocksize=blocksize,
        )
        check_hyperparameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        check_hyperparameters(self.param_groups[-1])  # after torch filled in the defaults

    def dynamic_maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(signed, unsigned) 8-bit dynamic maps on ``device``, made once per device."""
        if device not in self._maps:
            self._maps[device] = (dynamic_map(signed=True).to(device), dynamic_map(signed=False).to(device))
        return self._maps[device]

    def uses_8bit(self, p: torch.Tensor, group: dict) -> bool:
        return group["optim_bits"] == 8 and p.numel() >= group["min_8bit_size"]

    def init_state(self, p: torch.Tensor, group: dict) -> dict:
        """Zero state for ``p``: float32 m and v, or the 8-bit codes of zeros with absmax 0."""
        state = {"step": 0}
        if self.uses_8bit(p, group):
            nblocks = -(-p.numel() // group["blocksize"])
            for name, code in zip(("exp_avg", "exp_avg_sq"), self.dynamic_maps(p.device)):
                zero = int((code == 0).nonzero()[0])  # the code of 0.0: what quantizing zeros gives
                codes = torch.full((p.numel(),), zero, dtype=torch.uint8, device=p.device)
                state[f"{name}_codes"] = self.pager.place(codes, p.device)
                absmax = torch.zeros(nblocks, dtype=torch.float32, device=p.device)
                state[f"{name}_absmax"] = self.pager.place(absmax, p.device)
        else:
            for name in ("exp_avg", "exp_avg_sq"):
                zeros = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                state[name] = self.pager.place(zeros, p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad or p.grad is None:
                    continue
                if p.grad.layout != torch.strided:
                    raise RuntimeError(
                        f"AdamW does not support sparse gradients (got layout {p.grad.layout} for a "
                        f"parameter of shape {tuple(p.shape)}); use torch.optim.SparseAdam"
                    )
                self.update(p, group)
        return loss

    def update(self, p: torch.Tensor, group: dict) -> None:
        """One step for one parameter: bring its state to the device, update, store it back."""
        if not self.state[p]:
            self.state[p] = self.init_state(p, group)
        state = self.state[p]
        state["step"] += 1
        working = self.pager.fetch(state, p.device)
        eight_bit = "exp_avg_codes" in working  # the state says how it is encoded (a loaded one too)
        blocksize = group["blocksize"]
        if eight_bit:
            signed, unsigned = self.dynamic_maps(p.device)
            exp_avg = dequantize_blockwise(working["exp_avg_codes"], working["exp_avg_absmax"], signed, blocksize)
            exp_avg_sq = dequantize_blockwise(
                working["exp_avg_sq_codes"], working["exp_avg_sq_absmax"], unsigned, blocksize
            )
            exp_avg, exp_avg_sq = exp_avg.view(p.shape), exp_avg_sq.view(p.shape)
        else:
            exp_avg, exp_avg_sq = working["exp_avg"], working["exp_avg_sq"]

        param = p if p.dtype == torch.float32 else p.float()
        grad = p.grad if p.grad.dtype == torch.float32 else p.grad.float()
        beta1, beta2 = group["betas"]
        adam_update(
            param, grad, exp_avg, exp_avg_sq, state["step"],
            group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
        )
        if param is not p:
            p.copy_(param)

        if eight_bit:
            working["exp_avg_codes"], working["exp_avg_absmax"] = quantize_blockwise(exp_avg, signed, blocksize)
            working["exp_avg_sq_codes"], working["exp_avg_sq_absmax"] = quantize_blockwise(
                exp_avg_sq, unsigned, blocksize
            )
        self.pager.store(state, working)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load hyperparameters and state, keeping state dtypes and putting each tensor where it lives.

        torch's own loader would cast every tensor of a floating-point parameter's state to the
        parameter's dtype (the uint8 codes included), so the state is restored here instead:
        each tensor in the dtype of :data:`STATE_DTYPES`, in a host buffer if this optimizer
        pages it, else on its parameter's device. ``step`` may be a tensor (torch's AdamW).
        """
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        own_groups = [dict(group) for group in self.param_groups]
        restored = {}
        for own_group, saved_group in zip(own_groups, saved_groups):  # check all before changing anything
            for unsupported in ("amsgrad", "maximize"):
                if saved_group.get(unsupported):
                    raise InputError(f"cannot load a state_dict with {unsupported}=True: AdamW implements {unsupported}=False")
            check_hyperparameters({**own_group, **saved_group})
            for p, index in zip(own_group["params"], saved_group["params"]):
                if index in saved_state:
                    restored[p] = self.restore(saved_state[index], p)
        super().load_state_dict({"state": {}, "param_groups": saved_groups})  # checks the group sizes
        for group, own_group in zip(self.param_groups, own_groups):
            for key, value in own_group.items():  # settings a torch.optim.AdamW checkpoint lacks
                group.setdefault(key, value)
        for p, state in restored.items():
            self.state[p] = state

    def restore(self, saved: dict, p: torch.Tensor) -> dict:
        """One parameter's saved state as this optimizer keeps it (dtypes, placement), checked."""
        state = {}
        for key, value in saved.items():
            if key == "step":
                state[key] = int(value.item() if isinstance(value, torch.Tensor) else value)
            elif isinstance(value, torch.Tensor):
                value = value.detach().to(STATE_DTYPES.get(key, value.dtype), copy=True)  # own it
                state[key] = self.pager.place(value, p.device)
            else:
                state[key] = value
        if {"exp_avg", "exp_avg_sq"} <= set(state):
            sizes_match = state["exp_avg"].shape == state["exp_avg_sq"].shape == p.shape
        elif {"exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"} <= set(state):
            sizes_match = state["exp_avg_codes"].numel() == state["exp_avg_sq_codes"].numel() == p.numel()
        else:
            raise InputError(
                f"optimizer state for a parameter of shape {tuple(p.shape)} holds neither float32 nor "
                f"8-bit AdamW state: keys {sorted(state)}"
            )
        if "step" not in state or not sizes_match:
            raise InputError(
                f"optimizer state does not fit its parameter of shape {tuple(p.shape)}: "
                f"{ {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in state.items()} }"
            )
        return state


__all__ = ["AdamW", "OPTIM_BITS", "adam_update", "check_hyperparameters"]
