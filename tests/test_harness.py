"""``fourbit eval --tasks``: lm-evaluation-harness on fourbit's model, checked against the harness
itself on the same weights: its own command line (``lm_eval run --model hf``, a subprocess that
never imports fourbit) and, through ``fourbit serve``, its ``local-completions`` model against its
``hf`` model. The references are the harness's numbers, computed by transformers (and, for the
4-bit folder, bitsandbytes) without fourbit's layers.

The task is a multiple-choice YAML file with local data, written here (no hub on this machine):
what users write for tasks of their own, and what hub tasks such as arc_easy are made of.
"""

import glob
import json
import logging
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import fourbit
from fourbit.cli import main
from fourbit.nn.lora import lora_adapters

CAPITALS = [
    ("France", ["Paris", "Lyon", "Marseille", "Nice"], 0),
    ("Germany", ["Munich", "Berlin", "Hamburg", "Cologne"], 1),
    ("Italy", ["Milan", "Naples", "Rome", "Turin"], 2),
    ("Spain", ["Barcelona", "Seville", "Valencia", "Madrid"], 3),
    ("Japan", ["Tokyo", "Osaka", "Kyoto", "Nagoya"], 0),
    ("Canada", ["Toronto", "Ottawa", "Vancouver", "Montreal"], 1),
    ("Australia", ["Sydney", "Melbourne", "Canberra", "Perth"], 2),
    ("Brazil", ["Rio de Janeiro", "São Paulo", "Salvador", "Brasília"], 3),
    ("Egypt", ["Cairo", "Alexandria", "Giza", "Luxor"], 0),
    ("Turkey", ["Istanbul", "Ankara", "Izmir", "Bursa"], 1),
    ("Switzerland", ["Zurich", "Geneva", "Bern", "Basel"], 2),
    ("Morocco", ["Casablanca", "Marrakesh", "Fez", "Rabat"], 3),
]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

# Dense float32 on both sides: the same transformers modules on the same weights; what can differ
# is fourbit's LoRA (x A^T B^T s added to the base output) against PEFT's, a different float32
# summation order: ~1e-6 per logit, summed over a continuation's few tokens.
DENSE_BOUND = 1e-4
# NF4 against transformers + bitsandbytes: each logit within 2e-3 of bitsandbytes' (the bound of
# tests/test_architectures.py, from its CPU kernel's own rounding); a continuation's
# log-likelihood sums a handful of log-softmax values, each off by at most twice that.
NF4_BOUND = 2e-2


@pytest.fixture(scope="module", autouse=True)
def offline(monkeypatch_module):
    for name, value in OFFLINE.items():
        monkeypatch_module.setenv(name, value)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("capitals-task")
    with open(folder / "capitals.jsonl", "w") as f:
        for country, choices, answer in CAPITALS:
            f.write(json.dumps({"country": country, "choices": choices, "answer": answer}, ensure_ascii=False) + "\n")
    (folder / "capitals.yaml").write_text(f"""\
task: capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "capitals.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: What is the capital of {{{{country}}}}?\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata:
  version: 1.0
""")
    return folder / "capitals.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, make_tiny_llama, chat_tokenizer):
    """A tiny Llama with the SmolLM2 tokenizer (whole 64-value blocks: bitsandbytes' AVX-512 CPU
    path misreads partial ones), its NF4 folder, and a LoRA adapter with non-zero B."""
    root = tmp_path_factory.mktemp("harness-model")
    dense = root / "dense"
    make_tiny_llama(dense, seed=3, vocab_size=len(chat_tokenizer), intermediate_size=192)
    chat_tokenizer.save_pretrained(dense)
    donor, _ = fourbit.load_model(dense, quantization=None, compute_dtype="float32")
    torch.manual_seed(4)
    fourbit.add_lora(donor, r=4, alpha=64, target="all-linear", verbose=False)
    for adapter in lora_adapters(donor).values():
        nn.init.normal_(adapter.lora_B.weight, std=0.5)  # strong: a random model is near uniform over its vocabulary
    fourbit.save_adapter(donor, root / "adapter")
    assert main(["quantize", str(dense), "--method", "nf4", "--compute-dtype", "float32", "--dtype", "float32",
                 "--output", str(root / "nf4")]) == 0
    return {"dense": dense, "nf4": root / "nf4", "adapter": root / "adapter"}


def harness_command_line(out, task_file, model_args: str, *extra) -> tuple[dict, list[dict]]:
    """``lm_eval run --model hf`` in its own process: its results and its samples of the task."""
    subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", model_args,
                    "--device", "cpu", "--tasks", str(task_file), "--output_path", str(out), "--log_samples", *extra],
                   check=True, capture_output=True, env=os.environ | OFFLINE, cwd=out.parent)
    results = json.loads(open(glob.glob(f"{out}/*/results_*.json")[0]).read())
    return results, [json.loads(line) for line in open(glob.glob(f"{out}/*/samples_capitals_*.jsonl")[0])]


def fourbit_eval(out, task_file, *argv) -> tuple[dict, list[dict]]:
    assert main(["eval", *argv, "--tasks", str(task_file), "--output", str(out), "--log-samples"]) == 0
    samples = out.with_name(f"{out.stem}_samples_capitals.jsonl")
    return json.loads(out.read_text()), [json.loads(line) for line in open(samples)]


def loglikelihoods(samples) -> list[list[float]]:
    return [[float(score) for score, _ in doc["filtered_resps"]] for doc in samples]


def test_eval_tasks_equals_the_harness_command_line_dense_with_adapter(tiny, task_file, tmp_path, capsys):
    """Same prompts (one few-shot example drawn by the harness's seed), same scores, same table."""
    settings = ["--num-fewshot", "1", "--limit", "10"]
    want, want_samples = harness_command_line(
        tmp_path / "harness", task_file, f"pretrained={tiny['dense']},peft={tiny['adapter']},dtype=float32",
        "--num_fewshot", "1", "--limit", "10")
    got, got_samples = fourbit_eval(tmp_path / "ours.json", task_file, str(tiny["dense"]), "--adapter",
                                    str(tiny["adapter"]), "--quantization", "none", "--compute-dtype", "float32",
                                    *settings)
    assert "|capitals|" in capsys.readouterr().out  # the harness's own table, printed by fourbit eval
    assert len(got_samples) == len(want_samples) == 10
    assert [d["arguments"] for d in got_samples] == [d["arguments"] for d in want_samples]  # same prompts
    assert "Question: What is the capital of" in got_samples[0]["arguments"]["gen_args_0"]["arg_0"].split("\n\n")[0]
    torch.testing.assert_close(torch.tensor(loglikelihoods(got_samples)), torch.tensor(loglikelihoods(want_samples)),
                               atol=DENSE_BOUND, rtol=0)
    for metric in ("acc,none", "acc_norm,none"):
        assert got["results"]["capitals"][metric] == want["results"]["capitals"][metric]
    assert got["n-shot"] == want["n-shot"] == {"capitals": 1}
    # the adapter is applied (by both): the plain base scores the first choice far from what both report
    assert abs(base_loglikelihood(tiny["dense"], want_samples[0]) - float(want_samples[0]["filtered_resps"][0][0])) > 0.1


def base_loglikelihood(folder, sample) -> float:
    """The first choice's log-likelihood under the dense base alone, in transformers, split into
    context and continuation tokens as the harness splits them (encode both, cut at the context's length)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    context, continuation = sample["arguments"]["gen_args_0"]["arg_0"], sample["arguments"]["gen_args_0"]["arg_1"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    whole, start = tokenizer(context + continuation)["input_ids"], len(tokenizer(context)["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(start, len(whole)))


def test_eval_tasks_on_a_4bit_folder_equals_the_harness_with_bitsandbytes(tiny, task_file):
    """The folder `fourbit quantize` wrote, read by the harness's hf model through transformers +
    bitsandbytes, and by fourbit (both in this process: the command line is the previous test's)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from fourbit.harness import TaskSelection, evaluate_tasks

    tasks = TaskManager(include_defaults=False, include_path=str(task_file.parent))  # the file's task alone: quick
    want = simple_evaluate(model="hf", model_args={"pretrained": str(tiny["nf4"]), "dtype": "float32", "device": "cpu"},
                           tasks=["capitals"], log_samples=True, task_manager=tasks)
    model, tokenizer = fourbit.load_model(tiny["nf4"], compute_dtype="float32")
    got = evaluate_tasks(model, tokenizer, TaskSelection(["capitals"], tasks), log_samples=True)
    want_samples, got_samples = want["samples"]["capitals"], got["samples"]["capitals"]
    want_ll, got_ll = torch.tensor(loglikelihoods(want_samples)), torch.tensor(loglikelihoods(got_samples))
    torch.testing.assert_close(got_ll, want_ll, atol=NF4_BOUND, rtol=0)
    # the same answer wherever the harness's best choice leads by more than the two can differ
    top2 = want_ll.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * NF4_BOUND
    assert clear.sum() >= len(CAPITALS) // 2, "the check needs documents whose answer is not a near tie"
    assert torch.equal(got_ll.argmax(1)[clear], want_ll.argmax(1)[clear])
    near = int((~clear).sum())
    assert abs(got["results"]["capitals"]["acc,none"] - want["results"]["capitals"]["acc,none"]) <= near / len(CAPITALS)


def test_local_completions_through_fourbit_serve_equals_the_harness_hf_model(tiny, task_file, caplog):
    """The harness's API model (echo + logprobs on /v1/completions, tokenizing through the server's
    /tokenize and /tokenizer_info) scores the base and, by its ``model`` name, the adapter served
    beside it, as its hf model scores the same weights in-process."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from fourbit.serve.adapters import AdapterSet
    from fourbit.serve.engine import Engine
    from fourbit.serve.server import OpenAIServer, make_http_server

    model, tokenizer = fourbit.load_model(tiny["dense"], quantization=None, compute_dtype="float32")
    adapters = AdapterSet(model)
    adapters.add("capitals-lora", tiny["adapter"])
    engine = Engine(model, tokenizer, adapters, max_batch=8)
    server = make_http_server(OpenAIServer(engine, "tiny"), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/completions"
    tasks = TaskManager(include_defaults=False, include_path=str(task_file.parent))  # the file's task alone: quick
    try:
        for name, peft in (("tiny", None), ("capitals-lora", tiny["adapter"])):
            with caplog.at_level(logging.INFO, logger="lm_eval.models.openai_completions"):
                served = simple_evaluate(model="local-completions", tasks=["capitals"], log_samples=True,
                                         model_args={"base_url": url, "model": name, "num_concurrent": 1,
                                                     "max_retries": 1, "batch_size": 8},
                                         task_manager=tasks)
            assert "Auto-detected remote tokenizer support" in caplog.text  # no local tokenizer: the server's
            hf_args = {"pretrained": str(tiny["dense"]), "dtype": "float32", "device": "cpu"}
            reference = simple_evaluate(model="hf", model_args=hf_args | ({"peft": str(peft)} if peft else {}),
                                        tasks=["capitals"], log_samples=True, task_manager=tasks)
            got, want = served["samples"]["capitals"], reference["samples"]["capitals"]
            torch.testing.assert_close(torch.tensor(loglikelihoods(got)), torch.tensor(loglikelihoods(want)),
                                       atol=DENSE_BOUND, rtol=0)
            assert [[g for _, g in d["filtered_resps"]] for d in got] == [[g for _, g in d["filtered_resps"]] for d in want]
            assert served["results"]["capitals"]["acc,none"] == reference["results"]["capitals"]["acc,none"]
            assert served["results"]["capitals"]["acc_norm,none"] == reference["results"]["capitals"]["acc_norm,none"]
    finally:
        server.shutdown()
        server.server_close()
        engine.close(timeout=30)  # its worker's OpenMP pool must not outlive the test (tests/conftest.py)


def test_eval_tasks_bad_input_is_one_line_and_loads_nothing(tiny, task_file, tmp_path, capsys):
    existing = tmp_path / "results.json"
    existing.write_text("{}")
    assert main(["eval", str(tiny["dense"]), "--tasks", str(task_file), "--output", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_text() == "{}"
    assert main(["eval", str(tiny["dense"]), "--tasks", str(task_file), "--num-fewshot", "-1"]) == 2
    assert "--num-fewshot must be 0 or more" in capsys.readouterr().err
    assert main(["eval", str(tiny["dense"]), "--tasks", str(tmp_path / "missing.yaml")]) == 2
    assert "Tasks not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --tasks and --perplexity are one or the other
        main(["eval", "--tasks", "x", "--perplexity", "y"])


def test_without_the_harness_eval_tasks_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets where it is not installed
    assert main(["eval", "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err
    assert "lm-evaluation-harness, which is not installed" in err and "pip install 'fourbit[eval]'" in err
