"""The training config: LLaMA-Factory's key names, checked before anything heavy runs.

A YAML file of ``key: value`` lines, overridden by ``key=value`` arguments on the command line
(values parsed as YAML scalars, so ``learning_rate=1e-4`` is a float and ``packing=true`` a
bool). Every key is validated and an error names the key, the value and what is allowed; an
unknown key suggests the closest known one (a typo must not be silently ignored). LLaMA-Factory's
keys without a field here (``stage``, ``bf16``, ``deepspeed``, ...) are mapped, accepted or
refused by train/llamafactory.py, which also gives a LLaMA-Factory config its own defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError
from ..optim import OPTIMIZERS
from ..quant.blockwise import BLOCKSIZES
from . import llamafactory
from .report import REPORTERS

log = logging.getLogger(__name__)

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
STRATEGIES = ("ddp", "fsdp")
BACKENDS = ("nccl", "gloo")
EVAL_STRATEGIES = ("steps", "epoch", "no")


@dataclass
class TrainConfig:
    # model and quantization
    model_name_or_path: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    quantization_bit: int | None = 4  # 4, or None for 16-bit LoRA
    quantization_type: str = "nf4"
    double_quantization: bool = True
    quantization_blocksize: int = 64
    compute_dtype: str = "auto"
    # LoRA
    lora_rank: int = 16
    lora_alpha: float | None = None  # None: 2 * lora_rank, as LLaMA-Factory
    lora_dropout: float = 0.0
    lora_target: str | list[str] = "all"
    lora_target_parameters: str | list[str] | None = None  # MoE expert weights (PEFT's target_parameters)
    use_rslora: bool = False
    use_dora: bool = False
    # optimization
    optim: str = "adamw"
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = True
    torch_compile: bool = False  # torch.compile each decoder layer (train/recipe.py compile_decoder_layers)
    global_batch_size: int | None = None  # examples per optimizer step over all ranks; None: batch x accumulation x ranks
    # several processes (torchrun; train/distributed.py)
    strategy: str = "ddp"  # "ddp": every rank holds the 4-bit base; "fsdp": FSDP2 shards it
    ddp_backend: str | None = None  # None: nccl with CUDA, gloo without
    ddp_timeout: int = 1800  # seconds a collective may wait for the other ranks
    # data
    dataset: str | None = None
    dataset_dir: str | None = None  # where dataset_info.json lives; default: the config's folder
    eval_dataset: str | None = None  # exact-match accuracy before and after training
    val_size: float = 0.0  # held out of dataset for an eval loss: a fraction in (0, 1), or a count >= 1; 0: none
    max_samples: int | None = None  # each dataset's first N rows only (LLaMA-Factory's meaning); None: all
    preprocessing_num_workers: int | None = None  # processes that tokenize the dataset; None: this one
    template: str = "auto"
    enable_thinking: bool | None = None  # passed to the chat template (Qwen3's thinking switch); None: its default
    cutoff_len: int = 1024
    train_on_prompt: bool = False
    allow_truncated_answers: bool = False  # train even when cutoff_len cuts most answers' end of turn
    packing: bool = False
    # output
    output_dir: str | None = None
    overwrite_output_dir: bool = False
    save_steps: int = 500
    save_total_limit: int | None = None
    save_only_model: bool = False  # checkpoints hold the adapter only (no optimizer state): smaller, not resumable
    logging_steps: int = 1
    eval_strategy: str = "steps"  # with val_size: the eval loss every eval_steps ("steps"), at each epoch's end, or "no"
    eval_steps: int | None = None  # with val_size: the eval loss every N steps and at the last; None: at each save
    do_eval: bool = False  # with val_size: the eval loss at the end even with eval_strategy "no"
    per_device_eval_batch_size: int | None = None  # None: per_device_train_batch_size
    report_to: str | list[str] = "none"  # tensorboard, wandb, mlflow: a name, a list or comma-separated (train/report.py)
    run_name: str | None = None  # the trackers' name for the run; None: output_dir's folder name
    logging_dir: str | None = None  # tensorboard's folder; None: output_dir/runs
    seed: int = 42
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "latest" in output_dir
    eval_max_new_tokens: int = 24
    plot_loss: bool = True

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    @property
    def targets(self) -> str | list[str]:
        """lora_target as add_lora takes it: "all", a list of names, or a regex string."""
        if isinstance(self.lora_target, list):
            return self.lora_target
        if self.lora_target in ("all", "all-linear"):
            return "all-linear"
        if "," in self.lora_target or self.lora_target.isidentifier():
            return [t.strip() for t in self.lora_target.split(",") if t.strip()]
        return self.lora_target  # a regular expression

    @property
    def target_parameters(self) -> list[str] | None:
        """lora_target_parameters as add_lora takes it: a list of names (or None)."""
        if isinstance(self.lora_target_parameters, str):
            return [t.strip() for t in self.lora_target_parameters.split(",") if t.strip()]
        return self.lora_target_parameters

    @property
    def trackers(self) -> list[str]:
        """report_to as a list of tracker names ([] for "none")."""
        names = self.report_to if isinstance(self.report_to, list) else self.report_to.split(",")
        names = [n.strip() for n in names if n.strip()]
        return [] if names == ["none"] else names

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """TrainConfig from a YAML file (or defaults) plus ``key=value`` overrides, validated."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise InputError(f"config file {path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(loaded, dict):
            raise InputError(f"{path}: expected a mapping of key: value lines, got {type(loaded).__name__}")
        values |= loaded
    values |= parse_overrides(overrides or [])
    if path is not None and not llamafactory.is_llamafactory(values):
        values.setdefault("dataset_dir", str(path.parent))  # LLaMA-Factory's default is data/ (translate)
    values, notes = llamafactory.translate(values)
    unknown = [k for k in values if k not in FIELDS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, [*FIELDS, *llamafactory.KEYS], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InputError(f"unknown config key {key!r}{hint} (known keys: {', '.join(FIELDS)}; and LLaMA-Factory's "
                         f"{', '.join(llamafactory.KEYS)})")
    config = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    validate(config)
    for note in notes:
        log.warning("%s", note)
    return config


def parse_overrides(overrides: list[str] | dict) -> dict[str, Any]:
    if isinstance(overrides, dict):
        return dict(overrides)
    out = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"override {item!r} is not of the form key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise InputError(f"override {item!r}: the value is not valid YAML (quote it: {key}='...')") from None
    return out


def _coerce(key: str, value: Any) -> Any:
    """Accept the natural spellings: '1e-4' for a float, 'true' for a bool, 'none' for None."""
    kind = FIELDS[key].type
    if key == "eval_strategy" and value is False:
        return "no"  # YAML 1.1 reads a bare `no` as false
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and "None" in kind):
        return None
    try:
        if kind.startswith("bool"):
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind.startswith("int"):
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
    except (TypeError, ValueError):
        raise InputError(f"config key {key!r}: {value!r} is not a valid {kind.split(' ')[0]}") from None
    if kind.startswith("str | list") and isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return str(value) if not isinstance(value, str) else value


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise InputError(f"config key {key!r}: {value!r} is not allowed; expected {allowed}")


def validate(c: TrainConfig) -> None:
    _check(c.quantization_bit in (4, None), "quantization_bit", c.quantization_bit,
           "4, or none for 16-bit LoRA (8-bit LLM.int8() is for inference: `fourbit quantize --method int8`)")
    _check(c.quantization_type in QUANT_TYPES, "quantization_type", c.quantization_type, f"one of {QUANT_TYPES}")
    _check(c.quantization_blocksize in BLOCKSIZES, "quantization_blocksize", c.quantization_blocksize, f"one of {BLOCKSIZES}")
    _check(c.compute_dtype in COMPUTE_DTYPES, "compute_dtype", c.compute_dtype, f"one of {COMPUTE_DTYPES}")
    _check(c.lora_rank > 0, "lora_rank", c.lora_rank, "a positive integer")
    _check(c.alpha > 0, "lora_alpha", c.lora_alpha, "a positive number")
    _check(0 <= c.lora_dropout < 1, "lora_dropout", c.lora_dropout, "a number in [0, 1)")
    experts = c.lora_target_parameters
    names = isinstance(experts, list) and all(isinstance(t, str) for t in experts)
    _check(experts is None or isinstance(experts, str) or names,
           "lora_target_parameters", experts, "expert weight names, a list or comma-separated (mlp.experts.gate_up_proj,...)")
    _check(not experts or (c.lora_dropout == 0 and not c.use_dora), "lora_target_parameters", experts,
           "LoRA on expert weights without lora_dropout and use_dora (as in PEFT)")
    _check(c.optim in OPTIMIZERS, "optim", c.optim, f"one of {OPTIMIZERS}")
    _check(c.learning_rate > 0, "learning_rate", c.learning_rate, "a number > 0")
    _check(c.weight_decay >= 0, "weight_decay", c.weight_decay, "a number >= 0")
    _check(c.max_grad_norm >= 0, "max_grad_norm", c.max_grad_norm, "a number >= 0 (0 disables clipping)")
    _check(c.lr_scheduler_type in SCHEDULERS, "lr_scheduler_type", c.lr_scheduler_type, f"one of {SCHEDULERS}")
    _check(0 <= c.warmup_ratio < 1, "warmup_ratio", c.warmup_ratio, "a number in [0, 1)")
    _check(c.warmup_steps >= 0, "warmup_steps", c.warmup_steps, "an integer >= 0")
    _check(c.num_train_epochs > 0 or c.max_steps > 0, "num_train_epochs", c.num_train_epochs, "> 0 (or set max_steps > 0)")
    _check(c.per_device_train_batch_size > 0, "per_device_train_batch_size", c.per_device_train_batch_size, "an integer > 0")
    _check(c.gradient_accumulation_steps > 0, "gradient_accumulation_steps", c.gradient_accumulation_steps, "an integer > 0")
    _check(c.global_batch_size is None or (c.global_batch_size > 0 and c.global_batch_size % c.per_device_train_batch_size == 0),
           "global_batch_size", c.global_batch_size,
           f"none or a positive multiple of per_device_train_batch_size ({c.per_device_train_batch_size})")
    _check(c.strategy in STRATEGIES, "strategy", c.strategy, f"one of {STRATEGIES}")
    _check(not (c.torch_compile and c.strategy == "fsdp"), "torch_compile", c.torch_compile,
           "false with strategy fsdp (compiling FSDP2-sharded layers is not supported yet; ddp or one process can)")
    _check(c.ddp_backend is None or c.ddp_backend in BACKENDS, "ddp_backend", c.ddp_backend,
           f"none (automatic) or one of {BACKENDS}")
    _check(c.ddp_timeout > 0, "ddp_timeout", c.ddp_timeout, "a number of seconds > 0")
    _check(c.cutoff_len >= 8, "cutoff_len", c.cutoff_len, "an integer >= 8")
    _check(c.save_steps > 0, "save_steps", c.save_steps, "an integer > 0")
    _check(c.save_total_limit is None or c.save_total_limit > 0, "save_total_limit", c.save_total_limit, "none or an integer > 0")
    _check(c.logging_steps > 0, "logging_steps", c.logging_steps, "an integer > 0")
    _check(c.val_size == 0 or 0 < c.val_size < 1 or (c.val_size >= 1 and float(c.val_size).is_integer()),
           "val_size", c.val_size, "0 (none), a fraction in (0, 1) of the dataset's examples, or a whole number >= 1 of them")
    _check(c.eval_steps is None or c.eval_steps > 0, "eval_steps", c.eval_steps, "none (at every save_steps) or an integer > 0")
    _check(c.eval_strategy in EVAL_STRATEGIES, "eval_strategy", c.eval_strategy, f"one of {EVAL_STRATEGIES}")
    _check(not c.do_eval or c.val_size > 0, "do_eval", c.do_eval,
           "false, or val_size > 0: the eval loss is computed on the examples val_size holds out")
    _check(c.max_samples is None or c.max_samples > 0, "max_samples", c.max_samples, "none (all rows) or an integer > 0")
    _check(c.preprocessing_num_workers is None or c.preprocessing_num_workers > 0, "preprocessing_num_workers",
           c.preprocessing_num_workers, "none (tokenize in this process) or an integer > 0")
    _check(c.per_device_eval_batch_size is None or c.per_device_eval_batch_size > 0, "per_device_eval_batch_size",
           c.per_device_eval_batch_size, "none (per_device_train_batch_size) or an integer > 0")
    _check(all(name in REPORTERS for name in c.trackers), "report_to", c.report_to,
           f"none, or one or more of {tuple(REPORTERS)} (a list, or names separated by commas)")
    _check(c.eval_max_new_tokens > 0, "eval_max_new_tokens", c.eval_max_new_tokens, "an integer > 0")
