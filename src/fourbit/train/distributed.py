"""QLoRA on several processes: torchrun's environment, data parallel (DDP) or sharded (FSDP2).

    torchrun --nproc-per-node N -m fourbit train CONFIG                       one machine
    torchrun --nnodes M --node-rank I --nproc-per-node N \\
             --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m fourbit train CONFIG   several

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT; :func:`init_ranks` joins that
process group (nccl with CUDA, gloo without; ``ddp_backend`` overrides) on device cuda:LOCAL_RANK
or the CPU. Without torchrun there is one process and no process group: the plain recipe.

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

Checkpoints and the adapter are gathered whole (every rank takes part) and written by rank 0
in the single-process format (the optimizer state keyed by parameter index, full tensors), then
all ranks meet at a barrier; so a checkpoint resumes on any number of ranks, with either
strategy. Every rank reads the checkpoint folder (a shared file system is assumed).

Bad input stops every rank together: the checks of the run's input are made on every rank
inside :meth:`Ranks.all_or_none`, which ends with one all-gather of each rank's error (or none)
and a hash of its config; a failure anywhere, or configs that differ, raises on every rank
before any other collective. A backend the hardware cannot run is refused before the process
group is joined. ``ddp_timeout`` bounds every collective, so a rank that died does not leave
the others waiting forever.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError
from .config import TrainConfig

FSDP_OPTIMIZERS = ("adamw", "adamw_torch")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank, world size, device and strategy (None: one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"

    def barrier(self) -> None:
        if self.strategy is not None:
            dist.barrier()

    def sum(self, *values: float) -> list[float]:
        """Each value summed over all ranks (float64)."""
        if self.strategy is None:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, items: list) -> list[list]:
        """Every rank's ``items`` (picklable), in rank order."""
        if self.strategy is None:
            return [items]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, items)
        return gathered

    # ------------------------------------------------------------------ bad input

    @contextlib.contextmanager
    def all_or_none(self, config: TrainConfig):
        """Run the block's checks on every rank, then stop every rank if any failed or the
        ranks' configs differ (one all-gather, the run's first collective)."""
        error = None
        try:
            yield
        except Exception as e:
            error = e
        if self.strategy is not None:
            reports: list = [None] * self.world_size
            message = None if error is None else f"{type(error).__name__}: {error}"
            dist.all_gather_object(reports, (config_hash(config), message))
            if error is None:
                failed = [(r, m) for r, (_, m) in enumerate(reports) if m]
                if failed:
                    raise InputError(f"rank {failed[0][0]} refused the run, so every rank stops: {failed[0][1]}")
                differ = [r for r, (h, _) in enumerate(reports) if h != reports[0][0]]
                if differ:
                    raise InputError(
                        f"the ranks were given different configs (rank {differ[0]}'s differs from rank 0's); "
                        f"every rank must get the same config file and key=value overrides"
                    )
        if error is not None:
            raise error

    def check(self, config: TrainConfig) -> None:
        """What this run's strategy cannot do, refused by name (call inside :meth:`all_or_none`)."""
        if config.global_batch_size is not None:
            per_step = config.per_device_train_batch_size * self.world_size
            if config.global_batch_size % per_step:
                raise InputError(
                    f"global_batch_size {config.global_batch_size} is not divisible by per_device_train_batch_size "
                    f"x world size = {config.per_device_train_batch_size} x {self.world_size}; choose a multiple of "
                    f"{per_step} or another number of processes"
                )
        if self.fsdp and config.eval_dataset:
            raise InputError(
                "eval_dataset with strategy fsdp: generation from a sharded model is not supported; evaluate the "
                "written adapter in one process (fourbit eval, or fourbit.load_adapter), or use strategy ddp"
            )
        if self.fsdp and config.optim not in FSDP_OPTIMIZERS:
            raise InputError(
                f"optim {config.optim!r} keeps block-wise 8-bit or paged state over whole tensors, which FSDP "
                f"shards; with strategy fsdp use one of {FSDP_OPTIMIZERS} (or strategy ddp)"
            )

    # ------------------------------------------------------------------ the step's data

    def micro_batches_per_step(self, config: TrainConfig) -> int:
        """S: micro-batches in one optimizer step, over all ranks."""
        if config.global_batch_size is not None:
            return config.global_batch_size // config.per_device_train_batch_size
        return config.gradient_accumulation_steps * self.world_size

    def shard(self, micro_batches: list) -> list[tuple[object, float]]:
        """This rank's share of a step's micro-batches with their weights (0: a repeat that only
        keeps the number of backward passes equal across ranks)."""
        mine = [(b, 1.0) for b in micro_batches[self.rank :: self.world_size]]
        rounds = -(-len(micro_batches) // self.world_size)
        return mine + [(micro_batches[0], 0.0)] * (rounds - len(mine))

    # ------------------------------------------------------------------ the engine

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the train loop calls: the model (one process), DDP over it, or the model
        itself sharded in place by FSDP2. Build the optimizer from its parameters afterwards."""
        if self.strategy is None:
            return model
        if self.fsdp:
            return _fully_shard(model)
        from torch.nn.parallel import DistributedDataParallel

        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # No buffer sync in forward (the model's buffers are the same frozen constants on every
        # rank); torch 2.13 names the switch forward_sync_buffers, earlier releases broadcast_buffers.
        no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in _ddp_arguments() else "broadcast_buffers"
        return DistributedDataParallel(model, device_ids=ids, init_sync=False, **{no_buffer_sync: False})

    def gradient_sync(self, engine: nn.Module, enabled: bool):
        """Reduce gradients in this backward (the step's last micro-batch) or keep accumulating."""
        if self.fsdp:
            engine.set_requires_gradient_sync(enabled)
        elif self.strategy is not None and not enabled:
            return engine.no_sync()
        return contextlib.nullcontext()

    def build_optimizer(self, config: TrainConfig, params: list):
        from ..optim import build_optimizer

        if self.fsdp:  # DTensor shards: torch's AdamW (fourbit's 32-bit AdamW follows it exactly)
            return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        return build_optimizer(config.optim, params, lr=config.learning_rate, weight_decay=config.weight_decay)

    # ------------------------------------------------------------------ checkpoints

    def full_optimizer_state(self, model: nn.Module, optimizer) -> dict:
        """The optimizer's state_dict with whole tensors, keyed by parameter index (rank 0's is
        complete; under FSDP the others get an empty dict). Every rank must call it."""
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        by_name = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not by_name:
            return {}
        index = {name: i for i, name in enumerate(_trainable_names(model))}
        state = {index[n]: {k: int(v) if k == "step" else v for k, v in s.items()} for n, s in by_name["state"].items()}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, model: nn.Module, optimizer, saved: dict) -> None:
        """Load a :meth:`full_optimizer_state` (from any number of ranks) into this run's optimizer."""
        if not self.fsdp:
            optimizer.load_state_dict(saved)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        names = _trainable_names(model)
        state = {names[i]: {k: torch.tensor(float(v)) if k == "step" else v for k, v in s.items()}
                 for i, s in saved["state"].items()}
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))


SINGLE = Ranks()  # one process, no process group


def init_ranks(config: TrainConfig) -> Ranks:
    """Join the process group torchrun describes in the environment (once per process), or
    return the single-process :class:`Ranks` when the process was not started by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Ranks()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.cuda.is_available()
    backend = config.ddp_backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise InputError(
            "ddp_backend nccl needs CUDA GPUs and this machine has none (torch.cuda.is_available() is False); "
            "use ddp_backend: gloo (or leave it unset) to train on CPUs"
        )
    if cuda and local >= torch.cuda.device_count():
        raise InputError(
            f"LOCAL_RANK {local} has no GPU: this machine has {torch.cuda.device_count()}; "
            f"start at most that many processes per node (torchrun --nproc-per-node)"
        )
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(seconds=config.ddp_timeout),
                                device_id=device if cuda else None)
    return Ranks(rank, world, local, device, config.strategy)


def config_hash(config: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


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


def destroy() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


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
