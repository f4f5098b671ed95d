"""Paged optimizer state: large state tensors live in host memory between steps.

An optimizer's state (Adam: two tensors the size of every parameter, or their 8-bit codes)
is needed only while that parameter is updated. Paging keeps each large state tensor in host
memory and brings it to the parameter's device just for its update:

    host buffer  --fetch-->  device copy  --update in place / replace-->  --store-->  host buffer

so device memory holds the states of one parameter at a time instead of all of them.

Which tensors are paged: exactly those with at least ``min_numel`` elements (bitsandbytes
pages state tensors of >= 1e5 elements; smaller ones, like per-block absmax, the step counter
and the states of small parameters, are normal tensors on the parameter's device, where the
copies would cost more than they save). The rule depends only on the tensor's size, so it
places a tensor the same way at creation, at every step and after ``load_state_dict``.

Host buffers are pinned (page-locked) when CUDA is available, so host<->device copies run at
full bus speed; on a machine without CUDA they are ordinary CPU tensors and the "device" of a
CPU parameter is the host itself. The code path is the same there: ``fetch`` always makes a
real copy, so a CPU run exercises the copy-in / write-back logic that a GPU run relies on.

What the short version leaves out, compared with bitsandbytes' paged optimizers: bitsandbytes
allocates CUDA unified memory (``cudaMallocManaged``) and lets the driver migrate pages on
demand, evicting to host only under memory pressure, with ``cudaMemPrefetchAsync`` before each
update. Here the copies are explicit and synchronous: ``fetch`` copies host -> device
(``non_blocking`` from pinned memory, which is ordered before the update's kernels on the same
stream), ``store`` copies device -> host and waits for it, so the host buffer is always
current when a step returns (state_dict, checkpoints). That costs two copies of the state per
step whether or not the device is short of memory, and overlaps no copy with compute; it is
simple and exactly correct, and copies never change a value, so paged and unpaged optimizers
give bit-identical results.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import InputError

PAGE_MIN_NUMEL = 100_000  # bitsandbytes' threshold: smaller state tensors stay on the device


class Pager:
    """Places optimizer state tensors (host buffers for large ones) and hands out device copies.

    ``min_numel=None`` pages nothing: every tensor stays where it is put, and ``fetch``/``store``
    pass tensors through untouched, so an unpaged optimizer runs the same code.
    """

    def __init__(self, min_numel: int | None = PAGE_MIN_NUMEL):
        if min_numel is not None and (isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0):
            raise InputError(f"page_min_numel must be an int >= 0, got {min_numel!r}")
        self.min_numel = min_numel

    def pages(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` (a state tensor) belongs in host memory."""
        return self.min_numel is not None and tensor.numel() >= self.min_numel

    def place(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``tensor``'s values where they belong: a new host buffer if paged, else on ``device``."""
        if not self.pages(tensor):
            return tensor.detach().to(device=device)
        pin = torch.cuda.is_available()  # checked when the buffer is made, not at import
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
        return host.copy_(tensor.detach())

    def fetch(self, state: Mapping[str, object], device: torch.device) -> dict[str, object]:
        """A working copy of one parameter's state: device copies of its paged tensors, the rest as is."""
        working = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and self.pages(value):
                copy = torch.empty(value.shape, dtype=value.dtype, device=device)
                working[key] = copy.copy_(value, non_blocking=value.is_pinned())
            else:
                working[key] = value
        return working

    def store(self, state: dict[str, object], working: Mapping[str, object]) -> None:
        """Write an updated working copy back: paged tensors into their host buffers, the rest by reference."""
        for key, value in working.items():
            held = state.get(key)
            if isinstance(held, torch.Tensor) and self.pages(held) and value is not held:
                if value.shape != held.shape or value.dtype != held.dtype:
                    raise InputError(
                        f"state {key!r} changed from {tuple(held.shape)} {held.dtype} to "
                        f"{tuple(value.shape)} {value.dtype}; a paged buffer keeps its shape and dtype"
                    )
                held.copy_(value)  # synchronous: the host buffer is current when this returns
            else:
                state[key] = value
