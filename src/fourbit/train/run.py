"""``fourbit train``: load the base, add LoRA, train; and the built-in default run.

With no config file and no dataset, ``fourbit train`` fine-tunes the embedded
SmolLM2-135M-Instruct in NF4 with double quantization on fourbit's own generated task
(train/default_task.py) and reports held-out exact-match accuracy before and after. Its
settings below were chosen to finish in about ten minutes on a 2-core CPU; every one can be
overridden with ``key=value``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..io.loader import load_model
from ..nn.lora import add_lora
from .checkpoint import check_output_dir
from .config import TrainConfig, load_config
from .data import Truncation, encode_dataset, resolve_dataset
from .default_task import write_default_dataset
from .distributed import init_ranks
from .recipe import TrainResult, train
from .templates import apply_template

DEFAULT_OUTPUT_DIR = "fourbit-output/smollm2-default-task"
DEFAULT_RUN = {
    "lora_rank": 16,
    "lora_alpha": 32,
    "lora_target": "all",
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.05,
    "max_steps": 100,
    "per_device_train_batch_size": 8,
    "cutoff_len": 96,
    "gradient_checkpointing": False,  # 135M parameters fit easily; checkpointing would cost ~30% time
    "save_steps": 50,
    "save_total_limit": 1,
    "seed": 0,
    "eval_max_new_tokens": 16,
    "overwrite_output_dir": True,  # the demo can be rerun
}


def run(config: TrainConfig) -> TrainResult:
    """Load ``config.model_name_or_path`` quantized, wrap it with LoRA, and train it (under
    torchrun: on this rank's device, see train/distributed.py)."""
    ranks = init_ranks(config)
    with ranks.all_or_none(config):
        preflight(config)  # before the model loads: a bad dataset or output_dir fails in a second, not minutes
    model, tokenizer = load_model(
        config.model_name_or_path,
        quantization=config.quantization_type if config.quantization_bit == 4 else None,
        double_quant=config.double_quantization,
        blocksize=config.quantization_blocksize,
        compute_dtype=config.compute_dtype,
        device=ranks.device,
        progress=ranks.is_main,
    )
    if tokenizer is None:
        raise ValueError(f"{config.model_name_or_path} has no tokenizer files; training needs one")
    torch.manual_seed(config.seed)  # the adapters' initialization is part of the run's seed
    add_lora(model, r=config.lora_rank, alpha=config.alpha, target=config.targets, dropout=config.lora_dropout,
             use_rslora=config.use_rslora, use_dora=config.use_dora, verbose=ranks.is_main,
             target_parameters=config.target_parameters)
    return train(model, tokenizer, config)


def preflight(config: TrainConfig, tokenizer=None) -> str | None:
    """The run's inputs checked without loading the model: the dataset files and their rows,
    output_dir and the checkpoint to resume. With the model's ``tokenizer`` (cheap to load on
    its own) also the encoding: every row, and what cutoff_len cuts (returned as a warning to
    print, or refused when it leaves most answers without their end of turn)."""
    if not config.dataset:
        raise ValueError("config key 'dataset': no dataset given; name a .json/.jsonl file or a dataset_info.json entry")
    if not config.output_dir:
        raise ValueError("config key 'output_dir': required, the folder the adapter and checkpoints go to")
    conversations = resolve_dataset(config.dataset, config.dataset_dir)
    if config.eval_dataset:
        resolve_dataset(config.eval_dataset, config.dataset_dir)
    check_output_dir(Path(config.output_dir), config.resume_from_checkpoint, config.overwrite_output_dir,
                     config.to_dict())
    if tokenizer is None:
        return None
    apply_template(tokenizer, config.template)
    truncation = Truncation()
    encode_dataset(tokenizer, conversations, config.cutoff_len, config.train_on_prompt, truncation=truncation)
    return truncation.check(config.cutoff_len, config.allow_truncated_answers)


def default_config(overrides: list[str] | None = None, write_data: bool = True) -> TrainConfig:
    """The built-in run's config; its generated dataset goes to a folder beside output_dir
    (written unless ``write_data`` is false, as for a dry run)."""
    config = load_config(None, {**DEFAULT_RUN, **_as_dict(overrides)})
    out = Path(config.output_dir or DEFAULT_OUTPUT_DIR)
    data = out.parent / f"{out.name}-data"
    train_file, eval_file = write_default_dataset(data) if write_data else (data / "train.jsonl", data / "eval.jsonl")
    config.output_dir = str(out)
    config.dataset, config.eval_dataset = str(train_file), str(eval_file)
    return config


def _as_dict(overrides: list[str] | None) -> dict:
    from .config import parse_overrides

    return parse_overrides(overrides or [])
