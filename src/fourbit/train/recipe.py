"""The QLoRA training recipe: setup, train loop, save. Read it top to bottom.

    model, tokenizer = fourbit.load_model(...)          # frozen base, 4-bit linears
    model = fourbit.add_lora(model, ...)                # trainable adapters
    result = fourbit.train(model, tokenizer, config)    # this file

The loss is token-weighted over an optimizer step: the summed cross-entropy of every trained
token in the step's micro-batches divided by their count, so gradient accumulation gives the
same gradient as one big batch. Logits at position t predict the token at t+1; labels of -100
(prompt and padding) are skipped. A non-finite loss or gradient stops the run before the
update is applied, naming the last good checkpoint.

With ``val_size``, examples are held out of training (train/data.py ``split_held_out``) and their
eval loss, the same loss over all of them in eval mode, is taken every ``eval_steps`` optimizer
steps (default: at each checkpoint) and at the last: a line ``{"step": N, "eval_loss": x}`` in
metrics.jsonl after that step's line, kept in the checkpoint's trainer_state.json (a resumed run
continues the series) and drawn in training_loss.png. Every line of metrics.jsonl also goes to
the trackers ``report_to`` names (train/report.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..chat_templates import apply_template, pad_id
from ..errors import InputError
from ..io.datasets import load_rows, resolve_dataset
from ..io.peft import adapter_state_dict, write_adapter_files
from ..memory import memory_report
from ..nn.linear4bit import Linear4bit
from ..nn.lora import count_parameters, lora_layers
from ..nn.lora_experts import expert_lora_layers
from ..nn.rms_norm import replace_rms_norms
from ..nn.short_attention import use_short_attention
from ..peak_memory import measured_peak, reset_peak
from .checkpoint import (
    METRICS_FILE,
    TrainState,
    check_output_dir,
    load_checkpoint_adapter,
    load_training_state,
    rotate,
    save_checkpoint,
    tidy_output_dir,
    trim_metrics,
)
from .config import TrainConfig
from .data import (
    IGNORE_INDEX,
    Truncation,
    batches,
    collate,
    encode_dataset,
    pack,
    split_held_out,
    steps_per_epoch,
)
from .distributed import Ranks, init_ranks
from .estimate import estimate_memory
from .evaluate import greedy_answers, score_answers
from .loss import causal_lm_loss
from .optimizer_state import build_optimizer
from .parallel import (
    check_strategy,
    clip_grad_norm,
    decoder_layers,
    gradient_sync,
    micro_batches_per_step,
    shard,
    wrap,
)
from .plot import plot_loss
from .report import Reporters, check_trackers

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    losses: list[float]
    eval_before: dict | None = None
    eval_after: dict | None = None
    steps: int = 0
    seconds: float = 0.0
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) on the val_size examples
    peak_memory: int | None = None  # bytes during training: GPU allocator peak, or the process's peak RSS on a CPU
    estimated_memory: int = 0  # bytes per GPU, train/estimate.py


def train(model, tokenizer, config: TrainConfig) -> TrainResult:
    """Fine-tune ``model``'s LoRA adapters on ``config.dataset``; returns losses and evaluations.

    On a CPU (without torch_compile) the model's Llama-family RMS norms are swapped for fourbit's,
    the same weights computed by native kernels (nn/rms_norm.py), and SDPA attention runs torch's
    math backend for bf16 sequences of up to 128 tokens (nn/short_attention.py). Under torchrun
    every rank calls this with the same config (train/distributed.py)."""
    # ---------------------------------------------------------------- setup
    ranks = init_ranks(config)
    run_config = config.to_dict()
    with ranks.all_or_none(config):  # a bad input on any rank stops every rank, before any other collective
        if not config.output_dir:
            raise InputError("config key 'output_dir': required, the folder the adapter and checkpoints go to")
        out = Path(config.output_dir)
        if ranks.is_main:
            tidy_output_dir(out, fresh=False)  # what an interrupted save left behind
    with ranks.all_or_none(config):
        if not config.dataset:
            raise InputError("config key 'dataset': no dataset given; name a .json/.jsonl file or a dataset_info.json entry")
        resume = check_output_dir(out, config.resume_from_checkpoint, config.overwrite_output_dir, run_config)
        if not any(p.requires_grad for p in model.parameters()):
            raise InputError("the model has no trainable parameters; call fourbit.add_lora(model, ...) before training")
        check_strategy(config, ranks)
        check_trackers(config)
    ranks.barrier()  # every rank has looked at output_dir before rank 0 writes to it
    if ranks.is_main:
        tidy_output_dir(out, fresh=resume is None)  # overwrite_output_dir: the old run's outputs go
        out.mkdir(parents=True, exist_ok=True)
    _seed_everything(config.seed)

    apply_template(tokenizer, config.template, config.enable_thinking)
    conversations = resolve_dataset(config.dataset, config.dataset_dir, max_samples=config.max_samples, seed=config.seed)
    if not conversations:
        raise InputError(f"dataset {config.dataset!r} has no rows")
    truncation = Truncation()
    examples = encode_dataset(tokenizer, conversations, config.cutoff_len, config.train_on_prompt, truncation=truncation,
        workers=config.preprocessing_num_workers)
    cut = truncation.check(config.cutoff_len, config.allow_truncated_answers)  # refuses training that cannot learn
    if cut and ranks.is_main:
        log.warning("%s", cut)
    train_ids, held_ids = split_held_out(len(examples), config.val_size, config.seed)  # before packing: whole examples
    examples, held_out = [examples[i] for i in train_ids], [examples[i] for i in held_ids]
    if config.packing:
        examples = pack(examples, config.cutoff_len)
    eval_set = _eval_set(config) if config.eval_dataset else None

    per_step = micro_batches_per_step(config, ranks)  # over all ranks
    micro_per_epoch = steps_per_epoch(len(examples), config.per_device_train_batch_size)
    steps_per_epoch_ = math.ceil(micro_per_epoch / per_step)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch_)
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)

    device = next(model.parameters()).device
    if device.type == "cpu" and not config.torch_compile:  # native norm kernels (a compiled graph fuses its own)
        replace_rms_norms(model)
        use_short_attention(model)  # SDPA's math backend for short bf16 sequences
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if config.torch_compile:
        compile_decoder_layers(model)
    if resume is not None:
        load_checkpoint_adapter(resume, model)  # before DDP or FSDP takes the model
    estimate = estimate_memory(config, device, ranks.world_size, ranks.strategy, model_config=model.config)
    if ranks.is_main:
        _banner(model, config, len(examples), len(held_out), total_steps, resume, ranks, per_step, estimate, device)
    engine = wrap(model, ranks)  # the module the loop calls: the model, DDP over it, or the model FSDP-sharded
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config, params, ranks)
    from transformers import get_scheduler

    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    state = TrainState()
    if resume is not None:
        state = load_training_state(resume, model, optimizer, scheduler, ranks)

    result = TrainResult(out, list(state.losses))
    if resume is not None and state.step >= total_steps and ranks.is_main:
        print(f"{resume} is the end of this run ({state.step} of {total_steps} steps): nothing left to train; "
              "writing its adapter")
    if eval_set is not None and resume is None:
        result.eval_before = _evaluate(model, tokenizer, eval_set, config, "before training", ranks)

    # ---------------------------------------------------------------- train loop
    model.train()
    if resume is not None and ranks.is_main:
        trim_metrics(out, state.step)  # steps recorded after the checkpoint are trained, and recorded, again
    # the trackers (rank 0's) before the file: one that fails to open leaves nothing open
    reporters = Reporters(config, run_config, state.step if resume is not None else None, enabled=ranks.is_main)
    metrics = open(out / METRICS_FILE, "a" if resume else "w") if ranks.is_main else None
    progress = tqdm(total=total_steps, initial=state.step, desc="training", unit="step", dynamic_ncols=True,
                    disable=not ranks.is_main)
    pad = pad_id(tokenizer)
    start = time.perf_counter()
    last_checkpoint = resume
    peak_since_reset = reset_peak(device)  # the peak reported below is the training's, not the loading's
    try:
        while state.step < total_steps:
            step_start = time.perf_counter()
            mine = shard(_next_micro_batches(len(examples), config, state, per_step), ranks)  # [(indices, weight)]
            micro = [(collate([examples[i] for i in idx], pad), weight) for idx, weight in mine]
            local_targets = sum(weight * int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b, weight in micro)
            (n_targets,) = ranks.sum(local_targets)  # the step's trained tokens on all ranks
            tokens = sum(weight * (int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel())
                         for b, weight in micro)  # counted on the host, before the batches move
            loss_sum = 0.0
            for i, (batch, weight) in enumerate(micro):
                batch = {k: v.to(device) for k, v in batch.items()}
                with gradient_sync(engine, ranks, enabled=i == len(micro) - 1):
                    loss = causal_lm_loss(engine, batch) * (weight / n_targets)
                    (loss * ranks.world_size).backward()  # DDP and FSDP average over ranks; see parallel.py
                loss_sum += loss.item()
            loss_sum, tokens = ranks.sum(loss_sum, tokens)
            grad_norm = clip_grad_norm(params, config.max_grad_norm)
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):  # the same values on every rank
                raise FloatingPointError(
                    f"loss {loss_sum} / gradient norm {grad_norm} is not finite at step {state.step + 1}; stopped "
                    f"before applying it. Last good checkpoint: {last_checkpoint or 'none (lower learning_rate?)'}"
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.losses.append(loss_sum)

            record = {
                "step": state.step, "epoch": round(state.epoch + state.micro_batch / max(micro_per_epoch, 1), 4),
                "loss": loss_sum, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "tokens_per_s": tokens / (time.perf_counter() - step_start),
            }
            _record(record, metrics, reporters)
            progress.update(1)
            if state.step % config.logging_steps == 0:
                progress.set_postfix(epoch=f"{record['epoch']:.2f}", loss=f"{loss_sum:.4f}",
                                     lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            if held_out and _eval_due(config, state, total_steps, micro_per_epoch):
                loss = eval_loss(engine, held_out, config.per_device_eval_batch_size or config.per_device_train_batch_size,
                                 pad, ranks, device)
                state.eval_losses.append([state.step, loss])  # before the checkpoint, which keeps it
                _record({"step": state.step, "eval_loss": loss}, metrics, reporters)
                if ranks.is_main:
                    progress.write(f"step {state.step}: eval_loss {loss:.4f} ({len(held_out)} held-out examples)")
            if state.step % config.save_steps == 0 or state.step == total_steps:
                last_checkpoint = save_checkpoint(
                    out / f"checkpoint-{state.step}", model, optimizer, scheduler, state, _base_name(model), run_config,
                    ranks, model_only=config.save_only_model,
                )
                if ranks.is_main:
                    rotate(out, config.save_total_limit)
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
        reporters.close()
    result.seconds = time.perf_counter() - start
    peak = measured_peak(device, peak_since_reset)
    result.peak_memory = peak.bytes if peak else None
    result.estimated_memory = estimate.total
    if ranks.is_main:
        print(f"memory per {'GPU' if device.type == 'cuda' else 'process'}: estimated "
              f"{estimate.total / 2**30:.2f} GiB, measured peak "
              + (f"{peak.format()}; measured/estimated {peak.bytes / max(estimate.total, 1):.2f}" if peak
                 else f"unavailable on {device.type}"))

    # ---------------------------------------------------------------- save
    model.eval()
    _write_adapter(model, out, ranks)
    result.losses, result.steps = list(state.losses), state.step
    result.eval_losses = [(step, loss) for step, loss in state.eval_losses]
    if config.plot_loss and state.losses and ranks.is_main:
        plot_loss(state.losses, out / "training_loss.png", eval_losses=result.eval_losses)
    if eval_set is not None:
        result.eval_after = _evaluate(model, tokenizer, eval_set, config, "after training", ranks)
    return result


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant checkpointing of every decoder layer: works with frozen embeddings and base,
    since it does not need the layer inputs to require grad. On a CPU each 4-bit layer then keeps
    its recomputed forward's dequantized weight for its backward (one layer's at a time: two
    dequantizations a step instead of three; on a GPU dequantizing is cheaper than the memory),
    except where its products dequantize inside themselves (float32, kernels/lora.py)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name in transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    for module in model.modules():
        if isinstance(module, Linear4bit) and module.weight.device.type == "cpu":
            module.keep_weight_for_backward = True


def compile_decoder_layers(model) -> None:
    """torch.compile every decoder layer, forward and backward (checkpointing, if on, recomputes
    the compiled forward). A step is then a few fused graphs per layer instead of hundreds of
    small kernels and Python calls: on an H100 the 8B QLoRA step went from 0.56 to 0.30-0.38 s
    (bench/RESULTS.md). The first step pays for the compilation (~15 s at 8B, all layers share
    one graph); a second sequence length recompiles once, after which lengths are dynamic."""
    for layer in decoder_layers(model):
        layer.compile()


@torch.no_grad()
def eval_loss(engine, examples: list[dict], batch_size: int, pad: int, ranks: Ranks, device: torch.device) -> float:
    """The held-out examples' loss, defined as the training loss is: the summed cross-entropy of
    every labelled token of all of them divided by their count (not a mean of batch means), in
    eval mode (no dropout). Each rank takes every world_size-th batch and the sums are added;
    a rank with fewer batches runs a weight-0 repeat, since under FSDP every forward gathers
    parameters from all ranks and a rank that skipped one would leave the others waiting."""
    chunks = [list(range(start, min(start + batch_size, len(examples)))) for start in range(0, len(examples), batch_size)]
    was_training = engine.training
    engine.eval()
    loss_sum, n_targets = 0.0, 0
    try:
        for indices, weight in shard(chunks, ranks):
            batch = collate([examples[i] for i in indices], pad)
            loss = causal_lm_loss(engine, {k: v.to(device) for k, v in batch.items()}).item()
            if weight:
                loss_sum += loss
                n_targets += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    finally:
        engine.train(was_training)
    loss_sum, n_targets = ranks.sum(loss_sum, n_targets)
    return loss_sum / n_targets


def _record(record: dict, metrics, reporters: Reporters) -> None:
    """One line of metrics.jsonl (rank 0's open file; None on the others), and the same to the trackers."""
    if metrics is not None:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
    reporters.log(record)


def _eval_due(config: TrainConfig, state: TrainState, total_steps: int, micro_per_epoch: int) -> bool:
    """Whether the step just taken is followed by an eval loss (eval_strategy; the last step
    always with "steps" and "epoch", and with "no" where do_eval asks for it)."""
    last = state.step == total_steps
    if config.eval_strategy == "steps":
        return state.step % (config.eval_steps or config.save_steps) == 0 or last
    if config.eval_strategy == "epoch":
        return state.micro_batch >= micro_per_epoch or last
    return last and config.do_eval


def _next_micro_batches(n_examples: int, config: TrainConfig, state: TrainState, per_step: int) -> list[list[int]]:
    """Index lists of the next optimizer step's ``per_step`` micro-batches (over all ranks),
    advancing ``state``'s position.

    An epoch's order is a pure function of (seed, epoch), so the position (epoch, micro-batch)
    is all a checkpoint needs, whatever the number of ranks. A step never crosses an epoch: the
    last one may be shorter.
    """
    per_epoch = steps_per_epoch(n_examples, config.per_device_train_batch_size)
    if state.micro_batch >= per_epoch:
        state.epoch, state.micro_batch = state.epoch + 1, 0
    count = min(per_step, per_epoch - state.micro_batch)
    order = batches(n_examples, config.per_device_train_batch_size, config.seed, state.epoch, start_step=state.micro_batch)
    state.micro_batch += count
    return [next(order) for _ in range(count)]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _base_name(model) -> str | None:
    return getattr(model.config, "_name_or_path", None) or None


def _write_adapter(model, out: Path, ranks: Ranks) -> None:
    """The final adapter's two PEFT files into output_dir, each replaced atomically (by rank 0,
    after every rank helped gather it)."""
    tensors = adapter_state_dict(model)
    if ranks.is_main:
        staging = out / f".adapter-{os.getpid()}"
        staging.mkdir(exist_ok=True)
        write_adapter_files(model, staging, _base_name(model), tensors)
        for f in staging.iterdir():
            os.replace(f, out / f.name)
        staging.rmdir()
    ranks.barrier()


def _eval_set(config: TrainConfig) -> tuple[list, list | None]:
    """Held-out conversations, and their rows' ``skill`` labels where a file has them."""
    conversations = resolve_dataset(config.eval_dataset, config.dataset_dir)
    path = Path(config.eval_dataset)
    skills = [row.get("skill", "all") for row in load_rows(path)] if path.is_file() else None
    return conversations, skills


def _evaluate(model, tokenizer, eval_set, config: TrainConfig, when: str, ranks: Ranks) -> dict:
    """Each rank answers every world_size-th conversation (DDP; FSDP refuses eval_dataset), the
    answers are gathered back into order, and every rank scores them; rank 0 prints."""
    conversations, skills = eval_set
    mine = greedy_answers(model, tokenizer, conversations[ranks.rank::ranks.world_size],
                          max_new_tokens=config.eval_max_new_tokens)
    shards = ranks.gather(mine)
    answers = [shards[i % ranks.world_size][i // ranks.world_size] for i in range(len(conversations))]
    result = score_answers(answers, conversations, skills)
    if ranks.is_main:
        print(f"held-out exact match {when}: {result['accuracy']:.1%} ({result['correct']}/{result['total']})"
              + "".join(f"  {skill} {acc:.0%}" for skill, acc in result.get("by_skill", {}).items()))
    return result


def _banner(model, config: TrainConfig, n_examples: int, n_held_out: int, total_steps: int, resume, ranks: Ranks,
            per_step: int, estimate, device) -> None:
    trainable, total = count_parameters(model)
    report = memory_report(model)
    experts = len(expert_lora_layers(model))
    layers = f"{len(lora_layers(model))} modules" + (f" and {experts} expert weights" if experts else "")
    where = f"{ranks.world_size} ranks, {ranks.strategy}" if ranks.strategy else "one process"
    print(
        f"fourbit train | {where} | device {device} ({torch.get_num_threads()} threads) "
        f"| model {report.total_bytes / 2**20:.0f} MiB "
        f"| LoRA r={config.lora_rank} alpha={config.alpha:g} on {layers} | trainable {trainable:,} / {total:,} "
        f"({100 * trainable / max(total, 1):.2f}%)\n"
        f"  {n_examples} examples" + (f" ({n_held_out} more held out for the eval loss)" if n_held_out else "")
        + f", {total_steps} steps of {per_step * config.per_device_train_batch_size} examples "
        f"({config.per_device_train_batch_size} per micro-batch, {per_step} micro-batches over {ranks.world_size} "
        f"rank{'s' if ranks.world_size > 1 else ''}), optim {config.optim}, lr {config.learning_rate:g} "
        f"({config.lr_scheduler_type}), gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}"
        + (f" | resuming from {resume}" if resume else "")
        + "\n" + estimate.format()
    )
