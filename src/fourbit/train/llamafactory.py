"""LLaMA-Factory's config keys that fourbit has no field of the same meaning for.

A LLaMA-Factory SFT config (``llamafactory-cli train x.yaml``) runs through ``fourbit train``
unchanged. Most of its keys are fourbit's own (train/config.py). Each of the others is one of:

- **mapped** onto fourbit's keys: ``bf16`` / ``pure_bf16`` -> ``compute_dtype: bfloat16``,
  ``fp16`` -> ``float16``, ``evaluation_strategy`` (the older name) -> ``eval_strategy``;
- **accepted** with the one value fourbit has (``stage: sft``, ``do_train: true``,
  ``finetuning_type: lora``, ``quantization_method: bnb``) or with no effect, said once
  (``trust_remote_code``: fourbit never runs a model's own code);
- **refused** with one line saying what fourbit does instead (``stage: dpo``, ``deepspeed``,
  ``quantization_method: hqq``, ...).

**Defaults.** A config that names LLaMA-Factory's method (``stage``, ``do_train`` or
``finetuning_type``) is read with LLaMA-Factory's defaults where they differ from fourbit's, so
that a file means what LLaMA-Factory documents for it: no ``quantization_bit`` is 16-bit LoRA
there (fourbit's own default is 4), ``lora_rank`` 8, and transformers' TrainingArguments defaults
(learning rate 5e-5, a linear schedule, 8 examples per device, a log line every 500 steps, no
evaluation during training unless ``eval_strategy`` says so, ``eval_steps`` = ``logging_steps``),
``cutoff_len`` 2048, no loss plot, and ``dataset_dir: data`` (relative to the working directory;
fourbit's own default is the config file's folder). ``translate`` returns the notes it wants printed (which
defaults it took, what it accepted without effect).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InputError

# Keys whose presence marks a LLaMA-Factory config (fourbit's own configs never write them).
MARKERS = ("stage", "do_train", "finetuning_type")

# LLaMA-Factory's (and transformers' TrainingArguments') defaults where fourbit's differ.
DEFAULTS: dict[str, Any] = {
    "quantization_bit": None,
    "lora_rank": 8,
    "learning_rate": 5e-5,
    "lr_scheduler_type": "linear",
    "per_device_train_batch_size": 8,
    "cutoff_len": 2048,
    "logging_steps": 500,
    "plot_loss": False,
    "eval_strategy": "no",
    "dataset_dir": "data",  # dataset_info.json's folder, relative to where the command runs
}

MULTI_GPU = ("fourbit trains on several GPUs through PyTorch's own engine: launch `torchrun --nproc-per-node N "
             "-m fourbit train ...` with strategy: ddp, or strategy: fsdp to shard the base as ZeRO-3 does")
TEXT_ONLY = "fourbit fine-tunes text-only models; images, videos and audio are not read"


@dataclass(frozen=True)
class Key:
    """What fourbit does with one LLaMA-Factory key: ``allowed`` values (None: any) are accepted,
    with ``note`` printed once when the value is not LLaMA-Factory's ``default`` (fourbit does
    what the default does); any other value is refused with ``instead``. ``maps_to`` names the
    fourbit key a true value sets, to ``value``."""

    allowed: tuple | None = None
    instead: str = ""
    note: str = ""
    default: Any = None
    maps_to: str | None = None
    value: Any = None


KEYS: dict[str, Key] = {
    # method
    "stage": Key(("sft",), "fourbit trains supervised fine-tuning (stage: sft) only; pre-training, reward "
                 "modelling, PPO, DPO and KTO are not available"),
    "do_train": Key((True,), "fourbit train always trains; evaluate a model or an adapter with `fourbit eval`"),
    "finetuning_type": Key(("lora",), "fourbit trains LoRA adapters (finetuning_type: lora, with use_dora or "
                           "use_rslora) on a frozen base; full, freeze and OFT fine-tuning are not available"),
    # model and quantization
    "quantization_method": Key(("bnb", "bitsandbytes"),
                               "fourbit quantizes the base to bitsandbytes' NF4/FP4 (quantization_method: bnb); "
                               "for GPTQ or AWQ, quantize with `fourbit quantize --method gptq|awq` and serve that"),
    "trust_remote_code": Key(None, default=False, note="trust_remote_code is accepted, but fourbit never runs a model's own code "
                             "(transformers is called with trust_remote_code=False): a model that needs it is "
                             "refused when it loads"),
    "use_fast_tokenizer": Key(None, default=True, note="use_fast_tokenizer: fourbit reads the model's tokenizer as transformers' "
                              "AutoTokenizer does by default (the fast one where the model has tokenizer.json)"),
    "upcast_layernorm": Key(None, default=False, note="upcast_layernorm: fourbit's norms keep their weights in the compute dtype "
                            "and normalize in float32, as transformers' RMSNorm does"),
    "quantization_device_map": Key((None,), "a device map is for inference (LLaMA-Factory refuses it in training "
                                   "too); fourbit trains on one device per process"),
    "use_unsloth": Key((False,), "fourbit has its own fused 4-bit and LoRA kernels, always on; Unsloth is not "
                       "used (use_unsloth: false, or leave it out)"),
    # data
    "overwrite_cache": Key(None, default=False, note="overwrite_cache: fourbit keeps no cache of tokenized data, so there is "
                           "nothing to overwrite: every run tokenizes its dataset afresh"),
    "dataloader_num_workers": Key(None, default=0, note="dataloader_num_workers: fourbit cuts batches from tokens already in "
                                  "memory, in the training process (preprocessing_num_workers parallelizes the "
                                  "tokenizing); no loader workers are started"),
    "image_max_pixels": Key((None,), TEXT_ONLY),
    "image_min_pixels": Key((None,), TEXT_ONLY),
    "video_max_pixels": Key((None,), TEXT_ONLY),
    "video_min_pixels": Key((None,), TEXT_ONLY),
    "freeze_vision_tower": Key(None, default=True, note="freeze_vision_tower: " + TEXT_ONLY),
    # precision (transformers' TrainingArguments; LLaMA-Factory's pure_bf16)
    "bf16": Key(None, maps_to="compute_dtype", value="bfloat16"),
    "pure_bf16": Key(None, maps_to="compute_dtype", value="bfloat16"),
    "fp16": Key(None, maps_to="compute_dtype", value="float16"),
    "evaluation_strategy": Key(None, maps_to="eval_strategy"),
    # fourbit's packing is LLaMA-Factory's neat packing: each example attends only to itself
    "neat_packing": Key(None, maps_to="packing", value=True),
    # several processes, other engines
    "deepspeed": Key((None,), MULTI_GPU),
    "ray_num_workers": Key((None, 1), MULTI_GPU),
    "ray_run_name": Key((None,), MULTI_GPU),
    "ray_storage_path": Key((None,), MULTI_GPU),
    "ray_init_kwargs": Key((None,), MULTI_GPU),
    "resources_per_worker": Key((None,), MULTI_GPU),
    "placement_strategy": Key((None,), MULTI_GPU),
    "use_kt": Key((False,), "KTransformers is not a fourbit backend; fourbit quantizes mixture-of-experts models "
                  "itself and trains LoRA on the experts through lora_target_parameters"),
    "kt_optimize_rule": Key((None,), "KTransformers is not a fourbit backend (see use_kt)"),
    "cpu_infer": Key((None,), "KTransformers is not a fourbit backend (see use_kt)"),
    "chunk_size": Key((None,), "KTransformers is not a fourbit backend (see use_kt)"),
    "use_swanlab": Key((False,), "fourbit reports to tensorboard, wandb or mlflow (report_to)"),
    # what other commands do
    "do_predict": Key((False,), "fourbit train does not predict; generate with `fourbit chat` or `fourbit serve`, "
                      "and score with `fourbit eval`"),
    "predict_with_generate": Key((False,), "fourbit train does not predict; see `fourbit eval`"),
    "export_dir": Key((None,), "export with `fourbit merge` (a merged Hugging Face folder) or `fourbit export` "
                      "(GGUF)"),
    "export_quantization_bit": Key((None,), "post-training quantization is `fourbit quantize --method gptq|awq|int8`"),
    "export_quantization_method": Key((None,), "post-training quantization is `fourbit quantize --method "
                                      "gptq|awq|int8`"),
    "export_quantization_dataset": Key((None,), "post-training quantization is `fourbit quantize ... "
                                       "--calibration FILE`"),
}


def is_llamafactory(values: dict) -> bool:
    return any(key in values for key in MARKERS)


def translate(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``values`` (a config's keys) with LLaMA-Factory's keys mapped, checked and removed, and
    LLaMA-Factory's defaults filled in for a LLaMA-Factory config; plus notes to print once."""
    out = {k: v for k, v in values.items() if k not in KEYS}
    notes = []
    for key, value in values.items():
        rule = KEYS.get(key)
        if rule is None:
            continue
        if rule.maps_to is not None:
            _map(key, value, rule, out)
        elif rule.allowed is not None and _normal(value) not in rule.allowed:
            raise InputError(f"config key {key!r}: {value!r} is not supported: {rule.instead}")
        elif rule.note and value is not None and value != rule.default:
            notes.append(rule.note)
    if is_llamafactory(values):
        taken = {k: v for k, v in DEFAULTS.items() if k not in out}
        out |= taken
        if out.get("eval_strategy") == "steps" and "eval_steps" not in out:
            out["eval_steps"] = out["logging_steps"]  # transformers' default
        if taken:
            settings = ", ".join(f"{k}: {'none' if v is None else v}" for k, v in taken.items())
            notes.insert(0, f"read as a LLaMA-Factory config (it sets {', '.join(k for k in MARKERS if k in values)}): "
                         f"LLaMA-Factory's defaults where the file is silent: {settings}")
    return out, notes


def _normal(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _map(key: str, value: Any, rule: Key, out: dict) -> None:
    target = rule.maps_to
    if rule.value is None:  # a plain rename
        if target in out and out[target] != value:
            raise InputError(f"config keys {key!r} and {target!r} disagree ({value!r} vs {out[target]!r}); keep one")
        out[target] = value
        return
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, bool):
        raise InputError(f"config key {key!r}: {value!r} is not a valid bool")
    if not value:
        return
    if target in out and out[target] != rule.value:
        raise InputError(f"config key {key!r}: true asks for {target} {rule.value}, but {target} is "
                         f"{out[target]!r} (from the file or another key); keep one")
    out[target] = rule.value
