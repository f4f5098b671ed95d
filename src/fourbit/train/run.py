"""``fourbit train``: load the base, add LoRA, train (the built-in default run's settings and
data are in demo/)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..chat_templates import apply_template
from ..errors import InputError
from ..io.datasets import resolve_dataset
from ..io.loader import load_model
from ..nn.lora import add_lora
from .checkpoint import check_output_dir
from .config import TrainConfig
from .data import Truncation, encode_dataset, held_out_count
from .distributed import init_ranks
from .recipe import TrainResult, train
from .report import check_trackers


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
        raise InputError(f"{config.model_name_or_path} has no tokenizer files; training needs one")
    return adapt_and_train(model, tokenizer, config, verbose=ranks.is_main)


def adapt_and_train(model, tokenizer, config: TrainConfig, verbose: bool = True) -> TrainResult:
    """LoRA as ``config`` says on ``model`` (any base: 4-bit, 16-bit, or one built by hand), then
    train it."""
    torch.manual_seed(config.seed)  # the adapters' initialization is part of the run's seed
    add_lora(model, r=config.lora_rank, alpha=config.alpha, target=config.targets, dropout=config.lora_dropout,
             use_rslora=config.use_rslora, use_dora=config.use_dora, verbose=verbose,
             target_parameters=config.target_parameters)
    return train(model, tokenizer, config)


def preflight(config: TrainConfig, tokenizer=None) -> str | None:
    """The run's inputs checked without loading the model: the dataset files and their rows,
    val_size against the dataset's size, output_dir and the checkpoint to resume, the trackers'
    libraries (report_to). With the model's ``tokenizer`` (cheap to load on its own) also the
    encoding: every row, and what cutoff_len cuts (returned as a warning to print, or refused
    when it leaves most answers without their end of turn)."""
    if not config.dataset:
        raise InputError("config key 'dataset': no dataset given; name a .json/.jsonl file or a dataset_info.json entry")
    if not config.output_dir:
        raise InputError("config key 'output_dir': required, the folder the adapter and checkpoints go to")
    conversations = resolve_dataset(config.dataset, config.dataset_dir, max_samples=config.max_samples, seed=config.seed)
    held_out_count(len(conversations), config.val_size)  # an example a row, so the recipe's split is refused here too
    if config.eval_dataset:
        resolve_dataset(config.eval_dataset, config.dataset_dir)
    check_output_dir(Path(config.output_dir), config.resume_from_checkpoint, config.overwrite_output_dir,
                     config.to_dict())
    check_trackers(config)
    if tokenizer is None:
        return None
    apply_template(tokenizer, config.template, config.enable_thinking)
    truncation = Truncation()
    encode_dataset(tokenizer, conversations, config.cutoff_len, config.train_on_prompt, truncation=truncation,
        workers=config.preprocessing_num_workers)
    return truncation.check(config.cutoff_len, config.allow_truncated_answers)
