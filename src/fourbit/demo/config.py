"""The built-in default run: with no config file and no dataset, ``fourbit train`` fine-tunes the
embedded SmolLM2-135M-Instruct in NF4 with double quantization on fourbit's own generated task
(demo/task.py) and reports held-out exact-match accuracy before and after. The settings below
were chosen to finish in about ten minutes on a 2-core CPU; every one can be overridden with
``key=value``.
"""

from __future__ import annotations

from pathlib import Path

from ..train.config import TrainConfig, load_config, parse_overrides
from .task import write_default_dataset

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


def default_config(overrides: list[str] | None = None, write_data: bool = True) -> TrainConfig:
    """The built-in run's config; its generated dataset goes to a folder beside output_dir
    (written unless ``write_data`` is false, as for a dry run)."""
    config = load_config(None, {**DEFAULT_RUN, **parse_overrides(overrides or [])})
    out = Path(config.output_dir or DEFAULT_OUTPUT_DIR)
    data = out.parent / f"{out.name}-data"
    train_file, eval_file = write_default_dataset(data) if write_data else (data / "train.jsonl", data / "eval.jsonl")
    config.output_dir = str(out)
    config.dataset, config.eval_dataset = str(train_file), str(eval_file)
    return config
