"""How one optimizer step runs over the ranks: which micro-batches each rank takes, and the model
wrapped for the strategy (one process, DDP or FSDP2) with its gradient reduction.

The gradient. An optimizer step takes the next S micro-batches of the epoch's order (S = ranks
x accumulation, or global_batch_size / per_device_train_batch_size), the same micro-batches
whatever the number of ranks; rank r takes micro-batches r, r+W, r+2W, ... With N_step the
count of trained tokens in all S micro-batches (all-reduced before the first backward) and
CE_r the summed cross-entropy of rank r's micro-batches, every rank backpropagates

    loss_r = W * CE_r / N_step,     and DDP / FSDP average over ranks:  (1/W) sum_r grad loss_r
                                                                       = grad (sum_r CE_r) / N_step

which is the gradient of one process accumulating all S micro-batches: W ranks x k
accumulation equals 1 rank x W*k, up to the order of float additions. When S is not a multiple
of W (the last step of an epoch), a rank with fewer micro-batches repeats one with weight 0, so
every rank runs the same number of backward passes: the gradient reduction happens inside
backward, and a rank that skipped one would leave the others waiting in it.

DDP, not a hand-written all-reduce: it buckets the LoRA gradients and overlaps their all-reduce
with the last micro-batch's backward (``no_sync`` skips it for the others), and it only ever
touches parameters that require grad, so the frozen 4-bit base is never communicated. Its
initial broadcast of every parameter (the whole base) is turned off; the few LoRA tensors are
broadcast from rank 0 instead, so all ranks start from rank 0's initialization.

FSDP2 (``strategy: fsdp``): ``fully_shard`` per decoder layer, then the root. Each rank keeps
1/W of every parameter as a DTensor, and a layer's parameters are all-gathered just before its
forward (and again before its backward) and freed after. The packed 4-bit codes are a uint8
parameter with requires_grad=False: FSDP2 all-gathers parameters of mixed dtypes through a
uint8 view of their bytes, and its mixed precision never casts non-floating parameters, so
the codes travel as bytes and are never converted into numbers (the "silent zero loss" of
packed weights cast to a float dtype). The quantization constants (absmax and the code tables,
1/32 of the codes' bytes with double quantization) stay a replicated attribute of each layer,
as in bitsandbytes' FSDP-QLoRA. Precision is the same as in one process, whatever the strategy:
the base computes in its compute dtype, the LoRA branch in the adapter's dtype (float32). So
FSDP2 gathers every parameter in its own dtype (no ``param_dtype`` cast: casting the LoRA
parameters to a bf16 compute dtype made a run's adapter depend on the strategy, 8e-3 apart
after 6 steps) and reduces gradients in float32. The optimizer
is torch.optim.AdamW, which updates DTensor shards (fourbit's 8-bit and paged states are
block-wise over whole tensors and are refused under FSDP).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError
from .config import TrainConfig
from .distributed import Ranks

FSDP_OPTIMIZERS = ("adamw", "adamw_torch")


def check_strategy(config: TrainConfig, ranks: Ranks) -> None:
    """What this run's strategy cannot do, refused by name (call inside :meth:`Ranks.all_or_none`)."""
    if config.global_batch_size is not None:
        per_step = config.per_device_train_batch_size * ranks.world_size
        if config.global_batch_size % per_step:
            raise InputError(
                f"global_batch_size {config.global_batch_size} is not divisible by per_device_train_batch_size "
                f"x world size = {config.per_device_train_batch_size} x {ranks.world_size}; choose a multiple of "
                f"{per_step} or another number of processes"
            )
    if ranks.fsdp and config.eval_dataset:
        raise InputError(
            "eval_dataset with strategy fsdp: generation from a sharded model is not supported; evaluate the "
            "written adapter in one process (fourbit eval, or fourbit.load_adapter), or use strategy ddp"
        )
    if ranks.fsdp and config.optim not in FSDP_OPTIMIZERS:
        raise InputError(
            f"optim {config.optim!r} keeps block-wise 8-bit or paged state over whole tensors, which FSDP "
            f"shards; with strategy fsdp use one of {FSDP_OPTIMIZERS} (or strategy ddp)"
        )


def micro_batches_per_step(config: TrainConfig, ranks: Ranks) -> int:
    """S: micro-batches in one optimizer step, over all ranks."""
    if config.global_batch_size is not None:
        return config.global_batch_size // config.per_device_train_batch_size
    return config.gradient_accumulation_steps * ranks.world_size


def shard(micro_batches: list, ranks: Ranks) -> list[tuple[object, float]]:
    """This rank's share of a step's micro-batches with their weights (0: a repeat that only
    keeps the number of backward passes equal across ranks)."""
    mine = [(b, 1.0) for b in micro_batches[ranks.rank :: ranks.world_size]]
    rounds = -(-len(micro_batches) // ranks.world_size)
    return mine + [(micro_batches[0], 0.0)] * (rounds - len(mine))


def wrap(model: nn.Module, ranks: Ranks) -> nn.Module:
    """The module the train loop calls: the model (one process), DDP over it, or the model
    itself sharded in place by FSDP2. Build the optimizer from its parameters afterwards."""
    if ranks.strategy is None:
        return model
    if ranks.fsdp:
        return _fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    for p in model.parameters():
        if p.requires_grad:
            dist.broadcast(p.data, src=0)
    ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    # No buffer sync in forward (the model's buffers are the same frozen constants on every
    # rank); torch 2.13 names the switch forward_sync_buffers, earlier releases broadcast_buffers.
    no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in _ddp_arguments() else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=ids, init_sync=False, **{no_buffer_sync: False})


def gradient_sync(engine: nn.Module, ranks: Ranks, enabled: bool):
    """Reduce gradients in this backward (the step's last micro-batch) or keep accumulating."""
    if ranks.fsdp:
        engine.set_requires_gradient_sync(enabled)
    elif ranks.strategy is not None and not enabled:
        return engine.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(params: list, max_norm: float) -> float:
    """The gradients' global L2 norm, clipping them to ``max_norm`` when it is > 0. Sharded
    (DTensor) gradients contribute their squares from every rank (the norm is all-reduced)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def _fully_shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)  # see the module docstring
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (transformers names their classes in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise InputError(f"{type(model).__name__} names no decoder layer class (_no_split_modules); "
                         "FSDP cannot shard it per layer")
    return layers


def _ddp_arguments() -> set[str]:
    from torch.nn.parallel import DistributedDataParallel

    return set(inspect.signature(DistributedDataParallel.__init__).parameters)
