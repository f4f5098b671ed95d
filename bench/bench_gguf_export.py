"""The main job's adapter exported to GGUF at every type, run by llama.cpp, next to fourbit.

    fourbit train                                   # the main job: its adapter in out/default
    python bench/bench_gguf_export.py [--adapter out/default] [--types f16,q8_0,...]

For the embedded SmolLM2-135M-Instruct with the adapter merged (``fourbit export``), at each
type: the file's size, perplexity through llama.cpp (llama-cpp-python) on the same text and
windows as ``fourbit compare`` (the first 8192 tokens of Python's documentation topics, windows
of 512, stride 256: perplexity.py, with llama.cpp computing the logits), and held-out exact match
on the main job's 90 held-out questions with llama.cpp's greedy generation (the prompt rendered
by the chat template, generation stopping at llama.cpp's end-of-generation tokens read from the
file). The first row is the unmerged adapter on the NF4 base in fourbit, as `fourbit train`
evaluates it. Figures go to bench/RESULTS.md with the device (CPU kind) and versions.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

TYPES = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")


class LlamaCppLogits:
    """What perplexity.py calls: ``model(input_ids=[1, T]).logits`` [1, T, vocab], from llama.cpp."""

    def __init__(self, llm):
        self.llm = llm

    def parameters(self):
        yield torch.zeros(1)

    def __call__(self, input_ids, use_cache=False):
        self.llm.reset()
        ids = input_ids[0].tolist()
        self.llm.eval(ids)
        logits = torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))[None]
        return type("Output", (), {"logits": logits})()


def llama_cpp_answers(llm, tokenizer, conversations, max_new_tokens: int = 24) -> list[str]:
    answers = []
    for conversation in conversations:
        text = tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # as train/evaluate.py renders it
        out = llm.create_completion(prompt=ids, max_tokens=max_new_tokens, temperature=0.0, top_k=1)
        answers.append(out["choices"][0]["text"])
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="out/default")
    parser.add_argument("--types", default=",".join(TYPES))
    args = parser.parse_args()

    import llama_cpp

    import fourbit
    from fourbit.compare import default_text_ids
    from fourbit.demo.task import make_default_dataset
    from fourbit.io.gguf_export import export_gguf
    from fourbit.perplexity import perplexity
    from fourbit.precision import cpu_kind
    from fourbit.train.evaluate import greedy_answers, score_answers

    versions = {n: md.version(n) for n in ("torch", "transformers", "gguf", "llama-cpp-python", "fourbit")}
    print(f"# {date.today()}  {platform.processor() or platform.machine()} ({cpu_kind()}), "
          f"{torch.get_num_threads()} threads  " + "  ".join(f"{k} {v}" for k, v in versions.items()))
    _, held = make_default_dataset()
    conversations = [row["messages"] for row in held]

    model, tokenizer = fourbit.load_model(None)
    fourbit.load_adapter(model, args.adapter)
    text, described = default_text_ids(tokenizer)
    start = time.perf_counter()
    ppl = perplexity(model, text).perplexity
    accuracy = score_answers(greedy_answers(model, tokenizer, conversations), conversations)["accuracy"]
    print(f"text: {described}")
    print(f"{'model':<28} {'MiB':>7} {'perplexity':>10} {'exact match':>11} {'s':>6}")
    print(f"{'fourbit NF4 + adapter':<28} {'':>7} {ppl:>10.4f} {accuracy:>11.1%} {time.perf_counter() - start:>6.0f}")
    del model

    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.types.split(","):
            start = time.perf_counter()
            path = Path(tmp) / f"model-{quant}.gguf"
            report = export_gguf(None, path, quant, adapter=args.adapter)
            llm = llama_cpp.Llama(str(path), n_ctx=1024, logits_all=True, verbose=False,
                                  n_threads=torch.get_num_threads())
            ppl = perplexity(LlamaCppLogits(llm), text).perplexity
            llm.reset()
            accuracy = score_answers(llama_cpp_answers(llm, tokenizer, conversations), conversations)["accuracy"]
            print(f"{'llama.cpp ' + quant:<28} {report.bytes / 2**20:>7.1f} {ppl:>10.4f} {accuracy:>11.1%} "
                  f"{time.perf_counter() - start:>6.0f}")
            del llm
            path.unlink()


if __name__ == "__main__":
    main()
