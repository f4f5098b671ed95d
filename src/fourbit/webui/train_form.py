"""The Train tab's form: the same config keys as a YAML file, validated by the same code.

The form's fields are config keys (FIELDS below, in the order shown); what a user fills in
becomes a dict of overrides that ``load_config`` reads exactly as it reads ``key=value`` on the
command line, so the UI refuses what ``fourbit train`` refuses, with the same words. The YAML a
run starts from holds the keys that differ from the defaults, with absolute paths, and is the
file behind the equivalent command ``fourbit train jobs/NAME/train.yaml``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError
from ..io.datasets import resolve_dataset
from ..io.sources import open_source
from ..optim import OPTIMIZERS
from ..train.config import FIELDS, QUANT_TYPES, SCHEDULERS, TrainConfig, load_config
from ..train.data import IGNORE_INDEX, encode_conversation
from ..train.estimate import estimate_memory
from ..train.report import REPORTERS


@dataclass(frozen=True)
class Field:
    key: str  # the config key
    label: str
    kind: str  # "text", "number", "bool" or "choice"
    info: str = ""
    choices: tuple = ()


# (group, fields): the form's sections, each a row of the page.
FORM: list[tuple[str, list[Field]]] = [
    ("Model", [
        Field("model_name_or_path", "model", "text",
              "a Hugging Face folder, a .gguf file or a hub id; empty: the embedded SmolLM2-135M-Instruct"),
        Field("quantization_bit", "quantization bits", "choice", "4: QLoRA; none: 16-bit LoRA", ("4", "none")),
        Field("quantization_type", "4-bit data type", "choice", "", QUANT_TYPES),
        Field("double_quantization", "double quantization", "bool", "the absmax constants in 8 bits"),
        Field("template", "chat template", "text",
              "auto: the model's own; chatml, llama3, alpaca; or LLaMA-Factory's names (qwen3_nothink, ...)"),
    ]),
    ("LoRA", [
        Field("lora_rank", "rank", "number"),
        Field("lora_alpha", "alpha", "text", "empty: 2 x rank"),
        Field("lora_dropout", "dropout", "number"),
        Field("lora_target", "targets", "text", "all, or module names: q_proj,v_proj,..."),
        Field("use_dora", "DoRA", "bool"),
        Field("use_rslora", "rsLoRA", "bool", "scale alpha / sqrt(rank)"),
    ]),
    ("Optimization", [
        Field("optim", "optimizer", "choice", "paged_*: state pages to the CPU under memory pressure", OPTIMIZERS),
        Field("learning_rate", "learning rate", "number"),
        Field("lr_scheduler_type", "scheduler", "choice", "", SCHEDULERS),
        Field("warmup_ratio", "warmup ratio", "number"),
        Field("num_train_epochs", "epochs", "number"),
        Field("max_steps", "max steps", "number", "> 0 overrides epochs"),
    ]),
    ("Batch", [
        Field("per_device_train_batch_size", "batch size", "number"),
        Field("gradient_accumulation_steps", "gradient accumulation", "number"),
        Field("cutoff_len", "cutoff length", "number", "tokens per example"),
        Field("gradient_checkpointing", "gradient checkpointing", "bool", "less memory, slower"),
        Field("save_steps", "save every N steps", "number"),
        Field("seed", "seed", "number"),
        Field("report_to", "report to", "choice", "a tracker, through its own writer (an extra to install)",
              ("none", *REPORTERS)),
    ]),
    ("Data", [
        Field("dataset", "dataset", "text",
              "a .json/.jsonl file (upload one below), or names in dataset_info.json; comma-separated"),
        Field("dataset_dir", "dataset_dir", "text", "where dataset_info.json lives; empty: the UI's working folder"),
        Field("eval_dataset", "held-out exact-match set", "text", "optional: accuracy before and after training"),
        Field("train_on_prompt", "train on prompt", "bool", "also learn the prompt tokens"),
        Field("val_size", "held out for the eval loss", "number", "a fraction (0.05) or a count (200); 0: none"),
        Field("eval_steps", "eval loss every N steps", "text", "empty: at each save, and at the end"),
    ]),
]
FORM_KEYS = [f.key for _, fields in FORM for f in fields]
PATH_KEYS = ("model_name_or_path", "dataset_dir", "eval_dataset")  # written absolute into the YAML


def default_value(key: str) -> Any:
    value = getattr(TrainConfig(), key)
    if key == "quantization_bit":
        return "4" if value == 4 else "none"
    return "" if value is None else value


def overrides_from_form(values: dict[str, Any], output_dir: Path, overwrite: bool = False) -> dict[str, Any]:
    """The form's values as config overrides: empty fields left to the defaults, paths made
    absolute (the run's process may start elsewhere), the run's folder as output_dir."""
    overrides: dict[str, Any] = {}
    for key in FORM_KEYS:
        value = values.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if isinstance(value, str):
            value = value.strip()
        if isinstance(value, float) and value.is_integer() and FIELDS[key].type.startswith("int"):
            value = int(value)
        if key in PATH_KEYS and Path(value).exists():
            value = str(Path(value).resolve())
        overrides[key] = value
    if overrides.get("dataset"):  # each existing file absolute; registered names stay names
        overrides["dataset"] = ",".join(str(Path(p).resolve()) if Path(p).is_file() else p
                                        for p in (s.strip() for s in overrides["dataset"].split(",")))
    overrides.setdefault("dataset_dir", os.getcwd())
    overrides["output_dir"] = str(output_dir.resolve())
    if overwrite:
        overrides["overwrite_output_dir"] = True
    return overrides


def build_config(overrides: dict[str, Any]) -> TrainConfig:
    """Validated as ``fourbit train key=value ...`` validates (InputError with the CLI's message)."""
    return load_config(None, overrides)


def config_yaml(config: TrainConfig) -> str:
    """The keys that differ from the defaults (output_dir and the data always)."""
    defaults = TrainConfig()
    keys = [f.name for f in dataclasses.fields(TrainConfig)
            if getattr(config, f.name) != getattr(defaults, f.name) or f.name in ("output_dir", "dataset")]
    return yaml.safe_dump({k: getattr(config, k) for k in keys}, sort_keys=False)


def memory_estimate(config: TrainConfig) -> str:
    return estimate_memory(config).format()


@functools.lru_cache(maxsize=4)
def tokenizer_of(model: str | None):
    """The model's tokenizer alone (the weights are not read): for the preview and the checks."""
    tokenizer = open_source(model).tokenizer()
    if tokenizer is None:
        raise InputError(f"{model} has no tokenizer files; training needs one")
    return tokenizer


def preview(config: TrainConfig, rows: int = 3) -> list[tuple[str, str | None]]:
    """The first ``rows`` conversations as training sees them: the rendered template, each piece
    labelled "trained" (its tokens are learned) or "masked" (label -100: prompt, padding)."""
    import copy

    from ..chat_templates import apply_template

    tokenizer = copy.copy(tokenizer_of(config.model_name_or_path))  # the template is set on a copy
    apply_template(tokenizer, config.template, config.enable_thinking)
    conversations = resolve_dataset(config.dataset, config.dataset_dir, max_samples=config.max_samples, seed=config.seed)
    pieces: list[tuple[str, str | None]] = []
    for index, messages in enumerate(conversations[:rows]):
        example = encode_conversation(tokenizer, messages, config.cutoff_len, config.train_on_prompt, index=index)
        pieces.append((f"example {index + 1} of {len(conversations)}\n", None))
        pieces += _runs(tokenizer, example["input_ids"], example["labels"])
        pieces.append(("\n\n", None))
    return pieces


def _runs(tokenizer, ids: list[int], labels: list[int]) -> list[tuple[str, str]]:
    """Consecutive tokens with the same role, decoded together."""
    runs, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (labels[end] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            label = "masked" if labels[start] == IGNORE_INDEX else "trained"
            runs.append((tokenizer.decode(ids[start:end]), label))
            start = end
    return runs
