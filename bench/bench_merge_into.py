"""Which merge to trust: the main job's adapter merged into the dequantized NF4 base it was trained
on, or into the base's original weights.

    fourbit train                                  # the main job: its adapter
    python bench/bench_merge_into.py [--adapter fourbit-output/smollm2-default-task]

For each ``--into`` (dequantized, original), ``fourbit merge`` writes a bfloat16 folder (the
default dtype), which transformers loads alone (float32 compute). Reported: held-out exact match
on the main job's 90 questions (greedy, as `fourbit train` scores them), and how far its logits
are from the unmerged adapter on the NF4 base (what was trained and evaluated): the mean
KL(unmerged || merged) per token and the max |difference| / max |logit| over the first 2048
tokens of ``fourbit compare``'s text. The first row is the unmerged adapter itself. The
embedded model's "original" weights are its GGUF's (Q4_1, dequantized): the weights the NF4
base was made from.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import tempfile
from datetime import date
from pathlib import Path

import torch


@torch.no_grad()
def logits(model, ids: list[int], window: int = 512) -> torch.Tensor:
    return torch.cat([model(input_ids=torch.tensor([ids[i:i + window]])).logits[0].float()
                      for i in range(0, len(ids), window)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="fourbit-output/smollm2-default-task")
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    import fourbit
    from fourbit.compare import default_text_ids
    from fourbit.demo.task import make_default_dataset
    from fourbit.io.merge import merge_adapter
    from fourbit.precision import cpu_kind
    from fourbit.train.evaluate import exact_match_accuracy

    versions = {n: md.version(n) for n in ("torch", "transformers", "fourbit")}
    print(f"# {date.today()}  {platform.processor() or platform.machine()} ({cpu_kind()})  "
          + "  ".join(f"{k} {v}" for k, v in versions.items()))
    _, held = make_default_dataset()
    conversations = [row["messages"] for row in held]
    model, tokenizer = fourbit.load_model(None, compute_dtype="float32", torch_dtype="float32")
    fourbit.load_adapter(model, args.adapter)
    ids, _ = default_text_ids(tokenizer, args.tokens)
    reference = logits(model, ids)
    accuracy = exact_match_accuracy(model, tokenizer, conversations)["accuracy"]
    print(f"{'model':<34} {'exact match':>11} {'KL/token':>9} {'max rel diff':>12}")
    print(f"{'unmerged: NF4 base + adapter':<34} {accuracy:>11.1%} {0:>9.2e} {0:>12.2e}")
    del model
    with tempfile.TemporaryDirectory() as tmp:
        for into in ("dequantized", "original"):
            folder = Path(tmp) / into
            merge_adapter(None, args.adapter, folder, into=into)
            merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            got = logits(merged, ids)
            kl = torch.nn.functional.kl_div(got.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                            reduction="batchmean").item()
            rel = ((got - reference).abs().max() / reference.abs().max()).item()
            accuracy = exact_match_accuracy(merged, tokenizer, conversations)["accuracy"]
            print(f"{'merged --into ' + into + ' (bf16)':<34} {accuracy:>11.1%} {kl:>9.2e} {rel:>12.2e}")
            del merged


if __name__ == "__main__":
    main()
