"""QLoRA on several processes: torchrun's environment, data parallel (DDP) or sharded (FSDP2).

    torchrun --nproc-per-node N -m fourbit train CONFIG                       one machine
    torchrun --nnodes M --node-rank I --nproc-per-node N \\
             --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m fourbit train CONFIG   several

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT; :func:`init_ranks` joins that
process group (nccl with CUDA, gloo without; ``ddp_backend`` overrides) on device cuda:LOCAL_RANK
or the CPU. Without torchrun there is one process and no process group: the plain recipe.

Bad input stops every rank together: the checks of the run's input are made on every rank
inside :meth:`Ranks.all_or_none`, which ends with one all-gather of each rank's error (or none)
and a hash of its config; a failure anywhere, or configs that differ, raises on every rank
before any other collective. A backend the hardware cannot run is refused before the process
group is joined. ``ddp_timeout`` bounds every collective, so a rank that died does not leave
the others waiting forever.

How a step runs over the ranks (data parallel or sharded) is train/parallel.py; the optimizer
and its checkpointed state, train/optimizer_state.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import InputError
from .config import TrainConfig


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


def destroy() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
