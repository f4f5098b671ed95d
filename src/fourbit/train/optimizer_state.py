"""The optimizer of a run and its state in checkpoints, whatever the strategy.

Under FSDP2 the optimizer is torch.optim.AdamW, which updates DTensor shards (fourbit's own 32-bit
AdamW follows it exactly; its 8-bit and paged states are block-wise over whole tensors, so
train/parallel.py refuses them with FSDP).

Checkpoints and the adapter are gathered whole (every rank takes part) and written by rank 0 in
the single-process format (the optimizer state keyed by parameter index, full tensors), then all
ranks meet at a barrier; so a checkpoint resumes on any number of ranks, with either strategy.
Every rank reads the checkpoint folder (a shared file system is assumed).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig
from .distributed import Ranks


def build_optimizer(config: TrainConfig, params: list, ranks: Ranks) -> torch.optim.Optimizer:
    """The run's optimizer over ``params``: ``config.optim`` (fourbit's AdamW, 32- or 8-bit, paged or
    not), or torch's AdamW over FSDP2's DTensor shards."""
    from .. import optim

    if ranks.fsdp:  # DTensor shards: torch's AdamW (fourbit's 32-bit AdamW follows it exactly)
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return optim.build_optimizer(config.optim, params, lr=config.learning_rate, weight_decay=config.weight_decay)


def full_optimizer_state(model: nn.Module, optimizer, ranks: Ranks) -> dict:
    """The optimizer's state_dict with whole tensors, keyed by parameter index (rank 0's is
    complete; under FSDP the others get an empty dict). Every rank must call it."""
    if not ranks.fsdp:
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


def load_optimizer_state(model: nn.Module, optimizer, saved: dict, ranks: Ranks) -> None:
    """Load a :func:`full_optimizer_state` (from any number of ranks) into this run's optimizer."""
    if not ranks.fsdp:
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


def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
