"""The ``fourbit`` command: one entry point, one subcommand per job (``fourbit SUB --help`` for each;
README.md lists them with their options, checked against this parser by tests/test_readme.py).

    fourbit train [CONFIG.yaml] [key=value ...]        QLoRA fine-tuning (no config: the built-in demo)
    fourbit quantize SRC --method ... --output DIR     bnb 4-bit, GPTQ, RTN, AWQ or int8 folders
    fourbit memory [SRC] | --model CONFIG.yaml         where a quantized model's bytes go; a training estimate
    fourbit merge --base SRC --adapter DIR --output DIR   an adapter merged into its base
    fourbit export [SRC] [--adapter DIR] --output FILE.gguf   GGUF for llama.cpp, Ollama, LM Studio
    fourbit chat [SRC] [--adapter NAME=DIR ...]        chat in the terminal
    fourbit serve [SRC] [--adapter NAME=DIR ...]       an OpenAI-compatible HTTP server
    fourbit eval [SRC] --tasks ... | --perplexity FILE   lm-evaluation-harness tasks, or perplexity
    fourbit compare [SRC] [--methods ...]              every quantization method on one model
    fourbit webui [--host H] [--port N] [--auth U:P]   the browser UI: train, chat, evaluate, export
    torchrun --nproc-per-node N -m fourbit train CONFIG.yaml      (several GPUs; train/distributed.py)

SRC is a Hugging Face folder, a .gguf file, a hub id, or omitted for the embedded
SmolLM2-135M-Instruct. This module parses arguments and calls the library; input errors
(``USER_ERRORS``) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .errors import USER_ERRORS, InputError
from .quant.blockwise import BLOCKSIZES


def _add_quant_args(p: argparse.ArgumentParser, methods: tuple[str, ...], flag: str) -> None:
    p.add_argument(flag, dest="method", choices=methods, default="nf4", help="4-bit data type (default: nf4)")
    p.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES, metavar="N",
                   help=f"values per absmax block, one of {BLOCKSIZES} (default: 64)")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="keep the absmax constants in float32 instead of 8 bits")
    p.add_argument("--compute-dtype", default="auto", help="bfloat16, float16, float32 or auto (default)")
    p.add_argument("--dtype", default="bfloat16",
                   help="dtype of the unquantized weights: embeddings, norms, lm_head (default: bfloat16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fourbit", description="QLoRA toolkit: 4-bit models, LoRA fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="QLoRA fine-tune (no config: the built-in demo on SmolLM2-135M-Instruct)")
    t.add_argument("config", nargs="?", help="YAML config with LLaMA-Factory keys")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and a memory estimate, then stop")
    t.set_defaults(run=_train)

    q = sub.add_parser("quantize", help="write a quantized Hugging Face folder: bnb-4bit (nf4, fp4), GPTQ (gptq, rtn), "
                       "AWQ (awq) or LLM.int8() (int8)")
    q.add_argument("source", help="model folder, .gguf file, hub id, or 'default'")
    _add_quant_args(q, ("nf4", "fp4", "gptq", "awq", "rtn", "int8"), "--method")
    q.add_argument("--bits", type=int, default=4, choices=[2, 4, 8], help="gptq/rtn: bits per weight (default 4; awq: 4 only)")
    q.add_argument("--group-size", type=int, default=128, help="gptq/awq/rtn: inputs per scale, -1 for one per row (default 128)")
    q.add_argument("--act-order", action="store_true", help="gptq: quantize the most-used input columns first")
    q.add_argument("--asym", action="store_true", help="gptq/rtn: asymmetric grid (a zero point per group)")
    q.add_argument("--damp", type=float, default=0.01, help="gptq: Hessian damping (default 0.01)")
    q.add_argument("--calibration", default=None, help="gptq/awq: .txt or .jsonl file (default: Python's documentation topics)")
    q.add_argument("--calibration-tokens", type=int, default=16384, help="gptq/awq: tokens of calibration (default 16384)")
    q.add_argument("--seq-len", type=int, default=512, help="gptq/awq: tokens per calibration sequence (default 512)")
    q.add_argument("--threshold", type=float, default=6.0, help="int8: outlier threshold (default 6.0; 0: none)")
    q.add_argument("--output", "-o", required=True, help="folder to create")
    q.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    q.set_defaults(run=_quantize)

    m = sub.add_parser("memory", help="print where a quantized model's bytes are")
    m.add_argument("source", nargs="?", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    _add_quant_args(m, ("nf4", "fp4", "int4", "none"), "--quantization")
    m.add_argument("--model", metavar="CONFIG", help="instead: estimate per-GPU memory of training this config")
    m.add_argument("--gpus", type=int, default=1, help="with --model: number of GPUs (default 1)")
    m.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp", help="with --model: default ddp")
    m.add_argument("--seq-len", type=int, default=None, help="with --model: tokens per sequence (default cutoff_len)")
    m.add_argument("--batch", type=int, default=None,
                   help="with --model: sequences per GPU (default per_device_train_batch_size)")
    m.set_defaults(run=_memory)

    g = sub.add_parser("merge", help="merge a LoRA adapter into its base: a plain Hugging Face folder (or 4-bit)")
    g.add_argument("--base", default=None, help="the adapter's base: folder, .gguf file, hub id (default: the embedded model)")
    g.add_argument("--adapter", required=True, help="PEFT adapter folder (e.g. what `fourbit train` wrote)")
    g.add_argument("--output", "-o", required=True, help="folder to create")
    g.add_argument("--dtype", default="bfloat16", help="bf16 (default), fp16 or fp32: dtype of the merged weights")
    g.add_argument("--requantize", choices=["nf4", "fp4"], default=None,
                   help="write a bnb-4bit folder instead, and print the error that adds")
    g.add_argument("--base-quantization", default=None, choices=["nf4", "fp4", "int4", "none"],
                   help="how the base was quantized in training (default: what the adapter's training_base.json "
                        "records, else nf4 as `fourbit train`; none: 16-bit LoRA)")
    g.add_argument("--blocksize", type=int, default=None,
                   help="the base's quantization block size in training (default: recorded)")
    g.add_argument("--no-double-quant", dest="double_quant", action="store_false", default=None,
                   help="the base was trained without double quantization (default: recorded)")
    g.add_argument("--into", choices=["dequantized", "original"], default="dequantized",
                   help="add the update to the base as trained on, dequantized (default), or to its original "
                        "16-bit weights (bench/RESULTS.md compares them)")
    g.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    g.set_defaults(run=_merge)

    x = sub.add_parser("export", help="write a GGUF file for llama.cpp, Ollama and LM Studio (and an Ollama Modelfile)")
    x.add_argument("source", nargs="?", default=None, help="model folder, .gguf file or hub id (default: the embedded model)")
    x.add_argument("--adapter", default=None, help="PEFT adapter folder, merged into the model first")
    x.add_argument("--format", default="gguf", choices=["gguf", "gguf-lora"],
                   help="gguf: the model (adapter merged); gguf-lora: the adapter alone, for llama.cpp's --lora")
    x.add_argument("--quant", default="q8_0", help="f16, bf16, q8_0 (default), q4_0, q4_k_m, q5_k_m or q6_k: type of the weights")
    x.add_argument("--output", "-o", required=True, help="the .gguf file to write")
    x.add_argument("--into", choices=["dequantized", "original"], default="dequantized",
                   help="with --adapter: merge into the dequantized base it was trained on (default) or the original weights")
    x.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    x.set_defaults(run=_export)

    c = sub.add_parser("chat", help="chat in the terminal (streaming); /adapter NAME switches adapters")
    _add_serving_args(c)
    c.add_argument("--use", default=None, metavar="NAME", help="adapter to start with (default: the first --adapter)")
    c.add_argument("--max-new-tokens", type=int, default=512)
    c.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--top-k", type=int, default=0)
    c.add_argument("--seed", type=int, default=None)
    c.set_defaults(run=_chat)

    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, ...)")
    _add_serving_args(v)
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $FOURBIT_API_KEY)")
    v.add_argument("--served-model-name", default=None, help="the base's name in the API (default: from SRC)")
    v.add_argument("--adapter-root", default=None,
                   help="allow /v1/load_lora_adapter for adapter folders under this folder (default: off)")
    v.add_argument("--max-batch", type=int, default=64,
                   help="rows decoded together; more wait for a free row (default 64: on a CPU a step of 64 rows "
                        "takes about twice one of 16)")
    v.add_argument("--prefix-cache-tokens", type=int, default=4096,
                   help="prompt tokens whose keys and values are kept for prompts that begin the same way "
                        "(a shared system prompt, a conversation so far); 0: none (default 4096)")
    v.add_argument("--max-concurrent", type=int, default=64,
                   help="rows in flight before 429, every prompt of a request times its n (default 64)")
    v.add_argument("--max-adapters", type=int, default=8,
                   help="adapters loaded from --adapter-root at once; the least recently used goes (default 8)")
    v.add_argument("--request-seconds", type=float, default=600.0,
                   help="the longest a request may decode; past it its answer ends as 'length' (default 600)")
    v.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    v.add_argument("--max-tokens", type=int, default=256,
                   help="new tokens for a request that gives no max_tokens (default 256); sampling is per request")
    v.set_defaults(run=_serve)

    e = sub.add_parser("eval", help="lm-evaluation-harness tasks (--tasks), or perplexity on a text file (--perplexity)")
    e.add_argument("source", nargs="?", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    e.add_argument("--adapter", default=None, metavar="DIR", help="a PEFT adapter to apply")
    what = e.add_mutually_exclusive_group(required=True)
    what.add_argument("--tasks", metavar="NAMES|FILE.yaml",
                      help="lm-evaluation-harness tasks, comma-separated: names (mmlu, hellaswag, arc_easy, "
                           "truthfulqa_mc2, ...) or YAML task files; needs the eval extra")
    what.add_argument("--perplexity", metavar="FILE", help=".txt, or .jsonl with a 'text' field per row")
    e.add_argument("--num-fewshot", type=int, default=None, metavar="N", help="--tasks: examples in each prompt "
                   "(default: the task's own)")
    e.add_argument("--limit", type=float, default=None, metavar="N",
                   help="--tasks: documents per task (a fraction below 1); for trying a task, not for numbers to quote")
    e.add_argument("--batch-size", type=int, default=1, metavar="N", help="--tasks: requests per forward (default 1)")
    e.add_argument("--apply-chat-template", action="store_true",
                   help="--tasks: wrap prompts in the model's chat template (for instruct models)")
    e.add_argument("--output", default=None, metavar="FILE.json",
                   help="--tasks: write the harness's results as JSON (with --log-samples, per-document samples "
                        "beside it)")
    e.add_argument("--log-samples", action="store_true", help="--tasks: keep every document's requests and scores")
    e.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    e.add_argument("--context", type=int, default=512, help="--perplexity: tokens per window (default 512)")
    e.add_argument("--stride", type=int, default=None,
                   help="--perplexity: tokens between window starts (default: context / 2)")
    e.add_argument("--quantization", choices=["nf4", "fp4", "int4", "none"], default="nf4",
                   help="how to load a dense SRC (default nf4; quantized folders keep their own)")
    e.add_argument("--compute-dtype", default="auto", help="bfloat16, float16, float32 or auto (default: bf16 where "
                   "the device computes it natively, else float32)")
    e.set_defaults(run=_eval)

    k = sub.add_parser("compare", help="every quantization method on one model: perplexity, bits, size, time")
    k.add_argument("source", nargs="?", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    k.add_argument("--methods", default="bf16,nf4,nf4-dq,fp4,int4-rtn,gptq,awq,int8", help="comma-separated")
    k.add_argument("--perplexity", default=None, metavar="FILE", help="text to score (default: the first 8192 "
                   "tokens of Python's documentation topics)")
    k.add_argument("--context", type=int, default=512, help="perplexity window (default 512)")
    k.add_argument("--group-size", type=int, default=128, help="int4-rtn, gptq and awq groups (default 128)")
    k.add_argument("--calibration", default=None, help="gptq and awq calibration file (default: Python's documentation topics)")
    k.add_argument("--calibration-tokens", type=int, default=16384,
                   help="tokens of it gptq and awq calibrate on (default 16384; AWQ's search costs ~20 forwards of each "
                        "layer over them)")
    k.add_argument("--plot", default=None, metavar="PNG", help="also draw perplexity against bits per parameter")
    k.set_defaults(run=_compare)

    w = sub.add_parser("webui", help="the browser UI: train (live curves), chat with adapters, evaluate, export")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    w.add_argument("--port", type=int, default=7860, help="default 7860")
    w.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login (default: none)")
    w.add_argument("--workdir", default="fourbit-webui",
                   help="where runs, jobs, uploads and exports go (default ./fourbit-webui)")
    w.set_defaults(run=_webui)
    return parser


def _adapter_spec(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, folder


def _add_serving_args(p) -> None:
    p.add_argument("source", nargs="?", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", action="append", type=_adapter_spec, default=[], metavar="NAME=DIR",
                   help="a PEFT adapter to load under NAME (repeatable)")
    p.add_argument("--quantization", choices=["nf4", "fp4", "int4", "none"], default="nf4",
                   help="how to load the base (default nf4; a bnb-4bit folder keeps its own)")
    p.add_argument("--dense-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="keep dequantized weights in memory between tokens (the dense model's memory). Default: "
                        "`serve` on a CPU, whose batched steps it makes faster; `chat` on a CPU only where the "
                        "native 4-bit kernel cannot be built (a C compiler is needed)")


def _load_for_serving(args):
    from .io.loader import load_model
    from .serve.adapters import AdapterSet

    model, tokenizer = load_model(args.source, quantization=None if args.quantization == "none" else args.quantization)
    adapters = AdapterSet(model)
    for name, folder in args.adapter:
        adapters.add(name, folder)
    return model, tokenizer, adapters


def _load(args, quantization):
    from .io.loader import load_model

    start = time.perf_counter()
    model, tokenizer = load_model(
        args.source, quantization=quantization, double_quant=args.double_quant,
        blocksize=args.blocksize, compute_dtype=args.compute_dtype, torch_dtype=args.dtype, progress=True,
    )
    return model, tokenizer, time.perf_counter() - start


def _train(args) -> None:
    import dataclasses
    import tempfile

    import yaml

    from .demo.config import default_config
    from .demo.task import write_default_dataset
    from .io.sources import open_source
    from .train.config import load_config
    from .train.distributed import destroy
    from .train.estimate import estimate_memory
    from .train.run import preflight, run

    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides, args.config = [args.config, *args.overrides], None
    config = load_config(args.config, args.overrides)
    builtin = args.config is None and config.dataset is None  # the built-in run on the generated task
    if builtin:
        config = default_config(args.overrides, write_data=not args.dry_run)
    if args.dry_run:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())
        print(estimate_memory(config).format())
        # the inputs, checked as the run checks them (the tokenizer loads without the weights); the
        # built-in task's data, written only when the run starts, is checked from a scratch copy
        tokenizer = open_source(config.model_name_or_path).tokenizer()
        with tempfile.TemporaryDirectory() as scratch:
            checked = config
            if builtin and not Path(config.dataset).exists():
                train_file, eval_file = write_default_dataset(Path(scratch))
                checked = dataclasses.replace(config, dataset=str(train_file), eval_dataset=str(eval_file))
            cut = preflight(checked, tokenizer)
        print(f"warning: {cut}" if cut else "dataset, output_dir and cutoff_len checked: the run can start")
        return
    from .train.allocator import keep_freed_memory

    keep_freed_memory()  # this process trains: a step's freed activations are reused, not faulted in again
    result = run(config)
    destroy()  # leave torchrun's process group, if this process joined one
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"trained {result.steps} steps in {result.seconds:.0f} s; adapter written to {result.output_dir}")
    if result.eval_before and result.eval_after:
        print(f"held-out exact match: {result.eval_before['accuracy']:.1%} before -> {result.eval_after['accuracy']:.1%} after")


def _quantize(args) -> None:
    from .io.checkpoint import save_quantized

    _check_output(args.output, args.overwrite, args.source)  # before the work, not after it
    if args.method in ("gptq", "awq", "rtn", "int8"):
        return _quantize_post_training(args)
    model, tokenizer, seconds = _load(args, args.method)
    path = save_quantized(model, tokenizer, args.output, overwrite=args.overwrite)
    print(f"quantized {args.source} to {args.method} (block {args.blocksize}, "
          f"double quant {'on' if args.double_quant else 'off'}) in {seconds:.1f} s -> {path}")


def _tokenizer_of(source):
    """The model's tokenizer alone (without loading the weights), or a one-line error."""
    from .io.sources import open_source

    tokenizer = open_source(source).tokenizer()
    if tokenizer is None:
        raise InputError(f"{source} has no tokenizer files; this command needs one to read text")
    return tokenizer


def _check_output(output, overwrite: bool, *sources) -> None:
    """An output folder that exists without --overwrite, or that is or holds an input, refused up front."""
    from .io.atomic import check_output_apart

    check_output_apart(output, *sources)
    if Path(output).exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; choose another output folder or pass --overwrite")


def _quantize_post_training(args) -> None:
    """gptq, rtn (GPTQ v1 folders), awq (AWQ GEMM folders) and int8 (transformers' 8-bit folders) from a dense model."""
    import torch

    from .io.checkpoint import save_quantized
    from .io.loader import load_model
    from .precision import parse_dtype
    from .ptq import CALIBRATED, quantize_dense
    from .ptq.calibration import calibration_tokens

    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = None
    if args.method in CALIBRATED:  # read before the model loads: a bad file fails in a second
        ids, origin = calibration_tokens(_tokenizer_of(args.source), args.calibration, args.calibration_tokens,
                                         args.seq_len, args.method.upper())
        print(f"calibration: {origin}", flush=True)
    model, tokenizer = load_model(args.source, quantization=None, torch_dtype="float32", device=device)
    done = quantize_dense(model, args.method, ids, args.bits, args.group_size, not args.asym,
                          args.act_order and args.method == "gptq", args.damp, args.threshold, progress=True)
    dtype = parse_dtype(args.dtype)
    model.to(dtype)  # the unquantized weights; quantized layers keep their stored types
    for module in model.modules():
        if hasattr(module, "qweight"):
            module.compute_dtype = dtype
    path = save_quantized(model, tokenizer, args.output, overwrite=args.overwrite)
    print(f"{done} in {time.perf_counter() - start:.1f} s -> {path}")


def _memory(args) -> None:
    from .memory import memory_report

    if args.model is not None:
        from .train.config import load_config
        from .train.estimate import estimate_memory

        print(estimate_memory(load_config(args.model), "cuda", args.gpus, args.strategy, args.seq_len, args.batch).format())
        return

    quantization = None if args.method == "none" else args.method
    model, _, seconds = _load(args, quantization)
    dq = "+ double quant" if args.double_quant and quantization else ""
    title = (f"{args.source or 'SmolLM2-135M-Instruct (embedded)'}: {args.method} {dq} block {args.blocksize}, "
             f"loaded in {seconds:.1f} s")
    print(memory_report(model).format(title))


def _merge(args) -> None:
    from .io.merge import RECORDED, merge_adapter

    start = time.perf_counter()
    quantization = {None: RECORDED, "none": None}.get(args.base_quantization, args.base_quantization)
    report = merge_adapter(
        args.base, args.adapter, args.output, dtype=args.dtype, base_quantization=quantization,
        double_quant=args.double_quant, blocksize=args.blocksize, requantize=args.requantize, overwrite=args.overwrite,
        into=args.into,
    )
    print(report.format())
    print(f"done in {time.perf_counter() - start:.1f} s")


def _export(args) -> None:
    from .io.gguf_export import export_gguf, export_gguf_lora

    start = time.perf_counter()
    if args.format == "gguf-lora":
        if args.adapter is None:
            raise InputError("--format gguf-lora writes an adapter: name it with --adapter DIR")
        report = export_gguf_lora(args.source, args.adapter, args.output, overwrite=args.overwrite)
    else:
        report = export_gguf(args.source, args.output, args.quant, adapter=args.adapter, overwrite=args.overwrite,
                             into=args.into)
    print(report.format())
    print(f"done in {time.perf_counter() - start:.1f} s")


def _chat_dense_cache(asked: bool | None, model) -> bool:
    """Whether ``fourbit chat`` keeps dequantized weights: as asked; else on a CPU only where the
    native 4-bit kernel is unavailable (one conversation decodes one row, which it serves from the
    4-bit codes as fast as the dense copy, bench/RESULTS.md)."""
    if asked is not None:
        return asked
    if next(model.parameters()).device.type != "cpu":
        return False
    from .kernels.cpu import native as cpu_native

    return not (cpu_native.enabled() and cpu_native.library() is not None)


def _chat(args) -> None:
    import contextlib

    from .nn.linear4bit import dense_weights
    from .serve.chat import Chat, run
    from .serve.generate import Sampling

    model, tokenizer, adapters = _load_for_serving(args)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    start = args.use or (args.adapter[0][0] if args.adapter else None)
    with dense_weights(model) if _chat_dense_cache(args.dense_cache, model) else contextlib.nullcontext():
        run(Chat(model, tokenizer, adapters, sampling, adapter=start))


def _serve(args) -> None:
    from pathlib import Path

    from .serve.engine import Engine, on_own_thread
    from .serve.server import Limits, OpenAIServer, make_http_server

    logging.getLogger("fourbit.serve").setLevel(logging.INFO)  # a line per request, with its id (stderr)
    model, tokenizer, adapters = on_own_thread(_load_for_serving, args)  # the engine's worker alone computes
    name = args.served_model_name or (Path(args.source).name if args.source else "smollm2-135m-instruct")
    api = OpenAIServer(
        Engine(model, tokenizer, adapters, max_batch=args.max_batch, dense_cache=args.dense_cache,
               prefix_cache=args.prefix_cache_tokens), name,
        api_key=args.api_key or os.environ.get("FOURBIT_API_KEY") or None,
        limits=Limits(max_body_bytes=args.max_body_bytes, max_concurrent=args.max_concurrent,
                      max_adapters=args.max_adapters, request_seconds=args.request_seconds,
                      default_max_tokens=args.max_tokens),
        adapter_root=args.adapter_root,
    )
    server = make_http_server(api, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving {name} (adapters: {', '.join(adapters.names) or 'none'}) on http://{host}:{port}/v1"
          f"{'' if api.api_key else ' without an API key'}", flush=True)
    try:
        server.serve_forever()  # Ctrl-C or SIGTERM: stops taking connections, lets the requests in flight finish
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        api.engine.close(timeout=api.limits.graceful_seconds)


def _eval(args) -> None:
    from .io.loader import load_model
    from .io.peft import load_adapter, read_adapter_config

    if args.tasks:
        from .harness import check_settings, select_tasks

        # a missing extra, bad settings, an unknown task or an output in the way: refused before the model loads
        check_settings(args.num_fewshot, args.limit, args.batch_size)
        if args.output:
            _check_output(args.output, args.overwrite, args.source, args.adapter)
        tasks = select_tasks(args.tasks)  # the harness indexes its thousands of tasks: seconds
    else:
        from .perplexity import read_text_tokens

        ids = read_text_tokens(_tokenizer_of(args.source), args.perplexity)  # before the model: a bad file fails at once
    if args.adapter:
        read_adapter_config(args.adapter)
    model, tokenizer = load_model(args.source, quantization=None if args.quantization == "none" else args.quantization,
                                  compute_dtype=args.compute_dtype)
    if args.adapter:
        load_adapter(model, args.adapter)
    name = f"{args.source or 'SmolLM2-135M-Instruct (embedded)'}{' + ' + args.adapter if args.adapter else ''}"
    if not args.tasks:
        from .perplexity import perplexity

        print(f"{name}: {perplexity(model, ids, args.context, args.stride).format()}")
        return
    from .harness import evaluate_tasks, results_table, write_results

    results = evaluate_tasks(model, tokenizer, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                             batch_size=args.batch_size, apply_chat_template=args.apply_chat_template,
                             log_samples=args.log_samples)
    print(f"{name}:")
    print(results_table(results))
    if args.output:
        for path in write_results(results, args.output):
            print(f"wrote {path}")


def _compare(args) -> None:
    from .compare import compare, format_table, text_ids
    from .train.plot import plot_points

    if args.plot:
        from .io.atomic import check_output_apart

        check_output_apart(args.plot, args.source, args.perplexity, args.calibration)
    ids, origin = text_ids(_tokenizer_of(args.source), args.perplexity)
    print(f"perplexity on {origin} ({len(ids)} tokens, context {args.context})", flush=True)
    rows = compare(args.source, [m.strip() for m in args.methods.split(",") if m.strip()], ids, args.group_size,
                   args.context, args.calibration, args.calibration_tokens, log=lambda line: print(line, flush=True))
    print(format_table(rows))
    if args.plot:
        path = plot_points([(r.bits_per_parameter, r.perplexity) for r in rows], [r.method for r in rows], args.plot)
        print(f"plot: perplexity against bits per parameter -> {path}")


def _webui(args) -> None:
    from .webui.app import launch

    launch(args.workdir, args.host, args.port, args.auth)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as e:  # bad input, named in one line (errors.py); anything else keeps its traceback
        print(f"fourbit {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
