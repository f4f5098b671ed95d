"""Instruction data: formats, registry, label masking, packing, collation and batch order.

Expectations are written out by hand (messages, dataset_info entries) or computed another way
than the code does (trained spans found by searching for the separately tokenized answer).
"""

import json

import pytest
import torch

from fourbit.io.datasets import detect_format, load_rows, resolve_dataset, to_messages
from fourbit.train.data import (
    IGNORE_INDEX,
    Truncation,
    batches,
    collate,
    encode_conversation,
    encode_dataset,
    pack,
    steps_per_epoch,
)

SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _write(path, rows, jsonl=False):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows))
    return path


def _find(haystack, needle):
    """Every start index of ``needle`` in ``haystack``."""
    return [i for i in range(len(haystack) - len(needle) + 1) if haystack[i:i + len(needle)] == needle]


# ------------------------------------------------------------------------------ files


def test_load_rows_json_and_jsonl(tmp_path):
    rows = [{"a": 1}, {"a": 2}]
    assert load_rows(_write(tmp_path / "x.json", rows)) == rows
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')  # blank lines are skipped
    assert load_rows(path) == rows


@pytest.mark.parametrize("name, text, expected", [
    ("bad.jsonl", '{"a": 1}\n{"a": \n', "bad.jsonl line 2: bad JSON"),
    ("list.jsonl", '{"a": 1}\n[1, 2]\n', "list.jsonl line 2: expected a JSON object"),
    ("bad.json", '[{"a": 1},\n {"a": ]', "bad.json line 2: bad JSON"),
    ("obj.json", '{"a": 1}', "expected a JSON list of objects"),
    ("row.json", '[{"a": 1}, 7]', "row.json row 1: expected a JSON object"),
    ("empty.json", "[]", "has no rows"),
    ("empty.jsonl", "\n\n", "has no rows"),
    ("data.csv", "a,b\n", "must end in .json or .jsonl"),
])
def test_load_rows_errors_name_file_and_place(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=expected):
        load_rows(tmp_path / name)


# ---------------------------------------------------------------------------- formats

ALPACA_ROW = {"instruction": "Translate.", "input": "chat", "output": "cat", "system": "Be brief.",
              "history": [["Hi", "Hello"]]}
ALPACA_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Translate.\nchat"}, {"role": "assistant", "content": "cat"},
]
SHAREGPT_ROW = {"conversations": [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
    {"from": "user", "value": "Translate.\nchat"}, {"from": "assistant", "value": "cat"},
]}
OPENAI_ROW = {"messages": ALPACA_MESSAGES, "extra": "ignored"}


@pytest.mark.parametrize("row, fmt", [
    (ALPACA_ROW, "alpaca"), (SHAREGPT_ROW, "sharegpt"), (OPENAI_ROW, "openai")])
def test_each_format_detected_and_converted(row, fmt):
    assert detect_format([row]) == fmt
    assert to_messages(row, fmt, 0) == ALPACA_MESSAGES


def test_alpaca_minimal_and_sharegpt_system_column():
    assert to_messages({"instruction": "Q", "output": "A"}, "alpaca", 0) == [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert to_messages({"instruction": "", "input": "Q", "output": "A"}, "alpaca", 0)[0] == {
        "role": "user", "content": "Q"}
    row = {"system": "S", "conversations": [{"from": "human", "value": "Q"},
                                            {"from": "gpt", "value": "A"}]}
    assert to_messages(row, "sharegpt", 0) == [{"role": "system", "content": "S"},
                                              {"role": "user", "content": "Q"},
                                              {"role": "assistant", "content": "A"}]


def test_detect_format_rejects_unknown_layout():
    with pytest.raises(ValueError, match="cannot tell the format of row 0.*'question'"):
        detect_format([{"question": "q", "answer": "a"}])


def _turns(*roles):
    return [{"role": r, "content": f"text {i}"} for i, r in enumerate(roles)]


@pytest.mark.parametrize("fmt, row, problem", [
    ("alpaca", {"instruction": "Q"}, "missing 'output'"),
    ("alpaca", {"instruction": "Q", "output": 3}, "'output' is int"),
    ("alpaca", {"instruction": "Q", "output": "  "}, "no assistant turn"),
    ("alpaca", {"output": "A"}, "missing 'instruction'"),
    ("alpaca", {"instruction": "Q", "output": "A", "history": [["only one"]]}, "history' item 0"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Q"}]}, "no assistant turn"),
    ("sharegpt", {"conversations": [{"from": "bot", "value": "Q"}]}, "unsupported role 'bot'"),
    ("sharegpt", {"messages": []}, "missing 'conversations'"),
    ("openai", {"messages": _turns("user", "user", "assistant")}, "turn 1 .* is user, not assistant"),
    ("openai", {"messages": _turns("assistant", "user")}, "turn 0 .* is assistant, not user"),
    ("openai", {"messages": _turns("user", "assistant", "user")}, "last turn is user"),
    ("openai", {"messages": _turns("user", "assistant", "system", "assistant")}, "turn 2"),
    ("openai", {"messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}]},
                             {"role": "assistant", "content": "A"}]}, "not a non-empty string"),
    ("openai", {"messages": [{"role": "human", "content": "Q"}]}, "unsupported role 'human'"),
])
def test_malformed_rows_name_row_format_and_expectation(fmt, row, problem):
    with pytest.raises(ValueError) as info:
        to_messages(row, fmt, 7)
    message = str(info.value)
    assert message.startswith(f"row 7 ({fmt} format): ")
    assert "expected" in message
    assert __import__("re").search(problem, message), message


# --------------------------------------------------------------------------- registry


def _registry(tmp_path):
    _write(tmp_path / "renamed.json", [{"q": "Translate.", "ctx": "chat", "a": "cat",
                                         "sys": "Be brief.", "past": [["Hi", "Hello"]]}])
    _write(tmp_path / "dialogs.jsonl", [{"dialog": [
        {"speaker": "policy", "text": "Be brief."},
        {"speaker": "customer", "text": "Hi"}, {"speaker": "agent", "text": "Hello"},
        {"speaker": "customer", "text": "Translate.\nchat"}, {"speaker": "agent", "text": "cat"},
    ]}], jsonl=True)
    _write(tmp_path / "plain.json", [{"instruction": "Q", "output": "A"}])
    info = {
        "renamed": {"file_name": "renamed.json", "formatting": "alpaca",
                    "columns": {"prompt": "q", "query": "ctx", "response": "a", "system": "sys",
                                "history": "past"}},
        "dialogs": {"file_name": "dialogs.jsonl", "formatting": "sharegpt", "ranking": False,
                    "columns": {"messages": "dialog"},
                    "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer",
                             "assistant_tag": "agent", "system_tag": "policy",
                             "observation_tag": "observation"}},
        "plain": {"file_name": "plain.json"},  # formatting defaults to alpaca
        "hub": {"hf_hub_url": "someone/data"},
        "tooly": {"file_name": "plain.json", "columns": {"tools": "tools"}},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))


def test_registry_with_column_and_tag_renames(tmp_path):
    _registry(tmp_path)
    assert resolve_dataset("renamed", tmp_path) == [ALPACA_MESSAGES]
    assert resolve_dataset("dialogs", tmp_path) == [ALPACA_MESSAGES]
    plain = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert resolve_dataset(" plain , renamed,dialogs", tmp_path) == [plain, ALPACA_MESSAGES,
                                                                    ALPACA_MESSAGES]


def test_file_paths_resolve_without_registry(tmp_path):
    path = _write(tmp_path / "d.jsonl", [SHAREGPT_ROW, OPENAI_ROW | {"messages": ALPACA_MESSAGES}],
                  jsonl=True)
    # the format is detected from the first row (sharegpt), so the openai row is malformed
    with pytest.raises(ValueError, match=r"row 1 \(sharegpt format\): missing 'conversations'"):
        resolve_dataset(str(path))
    _write(path, [SHAREGPT_ROW, SHAREGPT_ROW], jsonl=True)
    assert resolve_dataset(str(path)) == [ALPACA_MESSAGES, ALPACA_MESSAGES]
    assert resolve_dataset("d.jsonl", tmp_path) == [ALPACA_MESSAGES, ALPACA_MESSAGES]


def test_registry_errors(tmp_path):
    _registry(tmp_path)
    with pytest.raises(ValueError, match="'nope' is neither.*dialogs, hub, plain, renamed, tooly"):
        resolve_dataset("plain,nope", tmp_path)
    with pytest.raises(ValueError, match="hub dataset 'someone/data': cannot be loaded"):  # offline in the tests
        resolve_dataset("hub", tmp_path)
    with pytest.raises(ValueError, match="'tooly'.*column 'tools' is not supported"):
        resolve_dataset("tooly", tmp_path)
    with pytest.raises(ValueError, match="no dataset_dir"):
        resolve_dataset("plain")
    _write(tmp_path / "plain.json", [{"instruction": "Q", "output": "A"}, {"instruction": "Q"}])
    with pytest.raises(ValueError, match=r"dataset 'plain' \(.*plain.json\) row 1 \(alpaca"):
        resolve_dataset("plain", tmp_path)


def _numbered(path, n):
    _write(path, [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(n)])


def _answers(conversations):
    return [c[-1]["content"] for c in conversations]


def test_max_samples_keeps_each_datasets_first_rows(tmp_path):
    """LLaMA-Factory's max_samples: each dataset cut to its first N rows, before they are joined."""
    _numbered(tmp_path / "a.json", 5)
    _write(tmp_path / "b.json", [{"instruction": f"q{i}", "output": f"b{i}"} for i in range(4)])
    assert _answers(resolve_dataset("a.json,b.json", tmp_path, max_samples=3)) == ["A0", "A1", "A2", "b0", "b1", "b2"]
    assert len(resolve_dataset("a.json,b.json", tmp_path, max_samples=100)) == 9


def test_num_samples_draws_rows_as_llamafactory_does(tmp_path):
    """num_samples: distinct rows while the dataset has them, then repeats; the draw is the seed's."""
    _numbered(tmp_path / "ten.json", 10)
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "four": {"file_name": "ten.json", "num_samples": 4}, "fifteen": {"file_name": "ten.json", "num_samples": 15},
        "bad": {"file_name": "ten.json", "num_samples": 0}}))
    four = _answers(resolve_dataset("four", tmp_path, seed=1))
    assert len(four) == len(set(four)) == 4 and set(four) <= {f"A{i}" for i in range(10)}
    assert four == _answers(resolve_dataset("four", tmp_path, seed=1))
    assert any(_answers(resolve_dataset("four", tmp_path, seed=s)) != four for s in range(2, 6))
    fifteen = _answers(resolve_dataset("fifteen", tmp_path, seed=1))
    assert len(fifteen) == 15 and set(fifteen) == {f"A{i}" for i in range(10)}  # every row, then 5 repeats
    assert _answers(resolve_dataset("fifteen", tmp_path, seed=1, max_samples=10)) == fifteen[:10]
    with pytest.raises(ValueError, match="num_samples 0 is not allowed; expected an integer >= 1"):
        resolve_dataset("bad", tmp_path)


def _hub_folder(root, name="someone/echo"):
    """A dataset folder as the hub holds one (a file per split), read by `datasets` offline."""
    folder = root / name
    folder.mkdir(parents=True)
    _write(folder / "train.jsonl", [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(6)], jsonl=True)
    _write(folder / "test.jsonl", [{"instruction": "Hi", "output": "Hello"}], jsonl=True)
    return folder


def test_hub_entries_load_through_the_datasets_library(tmp_path):
    folder = _hub_folder(tmp_path)
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "echo": {"hf_hub_url": str(folder), "num_samples": 3},
        "echo_test": {"hf_hub_url": str(folder), "split": "test", "columns": {"prompt": "instruction"}},
        "echo_missing": {"hf_hub_url": str(folder), "split": "validation"},
        "modelscope_only": {"ms_hub_url": "someone/echo"},
        "both": {"hf_hub_url": str(folder), "ms_hub_url": "someone/echo"},
    }))
    assert len(resolve_dataset("echo", tmp_path)) == 3
    assert resolve_dataset("echo_test", tmp_path) == [[{"role": "user", "content": "Hi"},
                                                       {"role": "assistant", "content": "Hello"}]]
    assert _answers(resolve_dataset("both", tmp_path)) == [f"A{i}" for i in range(6)]
    with pytest.raises(ValueError, match="hub dataset .*echo.*cannot be loaded .*validation"):
        resolve_dataset("echo_missing", tmp_path)
    with pytest.raises(ValueError, match="key 'ms_hub_url' is not supported"):
        resolve_dataset("modelscope_only", tmp_path)


def test_a_hub_id_as_the_dataset(tmp_path, monkeypatch):
    """``dataset: org/name`` that is neither a file nor a registered name is read from the hub
    (here a folder of that name, which `datasets` reads the same way), rows checked as a file's."""
    monkeypatch.chdir(tmp_path)
    _hub_folder(tmp_path)
    assert _answers(resolve_dataset("someone/echo", max_samples=2)) == ["A0", "A1"]
    _write(tmp_path / "someone" / "echo" / "train.jsonl", [{"instruction": "Q", "output": "A"}, {"instruction": "Q"}],
           jsonl=True)
    with pytest.raises(ValueError, match=r"dataset 'someone/echo' \(hub someone/echo\) row 1 \(alpaca format\)"):
        resolve_dataset("someone/echo")


def test_hub_without_the_datasets_library_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ValueError, match=r"needs the `datasets` library: pip install \"fourbit\[hub\]\""):
        resolve_dataset("someone/echo")


def test_registry_entry_keys_for_hub_only_on_a_local_file(tmp_path):
    _numbered(tmp_path / "ten.json", 10)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"x": {"file_name": "ten.json", "subset": "en"}}))
    with pytest.raises(ValueError, match="subset apply to hub datasets"):
        resolve_dataset("x", tmp_path)
    with pytest.raises(ValueError, match="dataset_dir 'REMOTE:org/data'.*download"):
        resolve_dataset("x", "REMOTE:org/data")


# --------------------------------------------------------------------------- encoding

QA = [{"role": "user", "content": "What colour is the sky?"},
      {"role": "assistant", "content": "Blue, mostly."}]
TWO_TURNS = QA + [{"role": "user", "content": "And grass?"},
                  {"role": "assistant", "content": "Green."}]


def _expected_trained(tokenizer, input_ids, answers):
    """Positions of each answer's own tokens + <|im_end|>, located by search, not by rendering."""
    positions = []
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for answer in answers:
        span = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]
        starts = _find(input_ids, span)
        assert len(starts) == 1, (answer, starts)
        positions += range(starts[0], starts[0] + len(span))
    return positions


@pytest.mark.parametrize("messages", [QA, TWO_TURNS], ids=["one-turn", "two-turns"])
def test_labels_train_answers_and_end_token_only(chat_tokenizer, messages):
    out = encode_conversation(chat_tokenizer, messages, cutoff_len=512)
    ids, labels = out["input_ids"], out["labels"]
    assert chat_tokenizer.decode(ids) == chat_tokenizer.apply_chat_template(messages, tokenize=False)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    trained = _expected_trained(chat_tokenizer, ids, answers)
    assert [k for k, label in enumerate(labels) if label != IGNORE_INDEX] == trained
    assert all(labels[k] == ids[k] for k in trained)
    assert chat_tokenizer.decode([ids[k] for k in trained]) == "".join(a + "<|im_end|>" for a in answers)


def test_smollm_default_system_prompt_is_rendered_and_masked(chat_tokenizer):
    out = encode_conversation(chat_tokenizer, QA, cutoff_len=512)
    text = chat_tokenizer.decode(out["input_ids"])
    assert text.startswith(f"<|im_start|>system\n{SMOL_DEFAULT_SYSTEM}<|im_end|>\n")
    prompt = [i for i, label in zip(out["input_ids"], out["labels"]) if label == IGNORE_INDEX]
    assert SMOL_DEFAULT_SYSTEM in chat_tokenizer.decode(prompt)


def test_train_on_prompt_trains_everything(chat_tokenizer):
    out = encode_conversation(chat_tokenizer, TWO_TURNS, cutoff_len=512, train_on_prompt=True)
    assert out["labels"] == out["input_ids"]


def test_truncation_keeps_prompt_and_cuts_tail(chat_tokenizer):
    full = encode_conversation(chat_tokenizer, QA, cutoff_len=512)["input_ids"]
    start = _expected_trained(chat_tokenizer, full, ["Blue, mostly."])[0]  # prompt length
    out = encode_conversation(chat_tokenizer, QA, cutoff_len=start + 2)
    assert out["input_ids"] == full[: start + 2]
    assert out["labels"] == [IGNORE_INDEX] * start + full[start: start + 2]
    with pytest.raises(ValueError, match=f"row 3: prompt of {start} tokens does not fit in "
                                         f"cutoff_len {start}"):
        encode_conversation(chat_tokenizer, QA, cutoff_len=start, index=3)


def test_rows_without_trainable_tokens_are_errors(chat_tokenizer, fresh_tokenizer):
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_conversation(chat_tokenizer, QA[:1], cutoff_len=512)
    # a template that never writes the EOS token gives the model nothing that ends a turn
    fresh_tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="does not end assistant turn 1 with the EOS token"):
        encode_conversation(fresh_tokenizer, QA, cutoff_len=512)


def test_template_that_rewrites_earlier_turns_is_an_error(fresh_tokenizer):
    fresh_tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}<|im_end|>"
        "{% endfor %}")
    with pytest.raises(ValueError, match="not a prefix of the whole conversation"):
        encode_conversation(fresh_tokenizer, QA, cutoff_len=512)


def test_prompt_tokens_are_those_generation_sees(fresh_tokenizer):
    """A prompt ending in "\\n\\n" tokenizes differently alone (one token) and inside the
    whole text ("\\n", "\\n"); the row must hold the prompt as generation tokenizes it."""
    fresh_tokenizer.chat_template = (  # newlines as expressions: transformers sets trim_blocks
        "{% for m in messages %}{{ m['role'] + ':\\n\\n' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ '<|im_end|>' }}{% endif %}{{ '\\n\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant:\\n\\n' }}{% endif %}")
    prompt = fresh_tokenizer.apply_chat_template(QA[:1], tokenize=False, add_generation_prompt=True)
    whole = fresh_tokenizer.apply_chat_template(QA, tokenize=False)
    alone = fresh_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert fresh_tokenizer(whole, add_special_tokens=False)["input_ids"][: len(alone)] != alone
    answer = fresh_tokenizer("Blue, mostly.<|im_end|>", add_special_tokens=False)["input_ids"]
    tail = fresh_tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    out = encode_conversation(fresh_tokenizer, QA, cutoff_len=512)
    assert out["input_ids"] == alone + answer + tail
    assert out["labels"] == [IGNORE_INDEX] * len(alone) + answer + [IGNORE_INDEX] * len(tail)
    assert fresh_tokenizer.decode(out["input_ids"]) == whole


def test_encode_dataset_rows_and_messages_name_the_row(chat_tokenizer):
    rows = [{"instruction": "What colour is the sky?", "output": "Blue, mostly."}] * 2
    encoded = encode_dataset(chat_tokenizer, rows, cutoff_len=512)
    assert encoded == [encode_conversation(chat_tokenizer, QA, 512)] * 2
    long = [QA, [{"role": "user", "content": "word " * 100}, QA[1]]]
    with pytest.raises(ValueError, match="row 1: prompt of"):
        encode_dataset(chat_tokenizer, long, cutoff_len=64)
    with pytest.raises(ValueError, match=r"row 2 \(alpaca format\)"):
        encode_dataset(chat_tokenizer, rows + [{"instruction": "x"}], cutoff_len=512)


# ---------------------------------------------------------------------------- packing


def _examples(lengths):
    """Example i holds tokens 1000*i + j, so every token says where it came from."""
    return [{"input_ids": [1000 * i + j for j in range(n)],
             "labels": [IGNORE_INDEX if j < n // 2 else 1000 * i + j for j in range(n)]}
            for i, n in enumerate(lengths)]


def test_pack_fits_keeps_every_token_once_and_restarts_positions():
    lengths = [5, 17, 3, 30, 8, 8, 1, 29, 12, 2, 16, 31]
    examples = _examples(lengths)
    rows = pack(examples, max_len=32)
    assert all(len(r["input_ids"]) <= 32 for r in rows)
    assert len(rows) < len(lengths)  # something was actually packed
    everything = sorted(t for r in rows for t in r["input_ids"])
    assert everything == sorted(t for e in examples for t in e["input_ids"])
    segments = []
    for row in rows:
        assert len(row["labels"]) == len(row["position_ids"]) == len(row["input_ids"])
        starts = [k for k, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            assert row["position_ids"][a:b] == list(range(b - a))
            segments.append((row["input_ids"][a:b], row["labels"][a:b]))
    assert len(segments) == len(examples)
    for ids, labels in segments:
        example = examples[ids[0] // 1000]
        assert ids == example["input_ids"]
        assert labels == [IGNORE_INDEX] + example["labels"][1:]  # boundary label masked


def test_pack_rejects_examples_longer_than_max_len():
    with pytest.raises(ValueError, match="example 1 has 40 tokens.*max_len 32"):
        pack(_examples([3, 40]), max_len=32)


def test_packed_rows_are_isolated_only_without_mask_and_cache():
    """The claim in data.py's docstring about transformers' Llama, checked on a tiny model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(config).eval()
    examples = [{"input_ids": torch.randint(0, 128, (n,)).tolist(), "labels": [0] * n}
                for n in (7, 5, 9)]
    batch = collate(pack(examples, max_len=32), pad_id=0)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, 21)
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([e["input_ids"]])).logits[0] for e in examples])
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits[0]
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)  # fp32 reordering only
    assert (leaky[7:] - alone[7:]).abs().max() > 1e-2  # the default cache disables isolation


# ------------------------------------------------------------------------- collation


def test_collate_right_pads_and_masks_padding():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_id=2)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())


def test_collate_packed_rows_pad_as_their_own_segment():
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 0]},
            {"input_ids": [4], "labels": [-100], "position_ids": [0]}]
    out = collate(rows, pad_id=0)
    assert set(out) == {"input_ids", "labels", "position_ids"}
    assert out["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert out["labels"].tolist() == [[-100, 2, 3], [-100, -100, -100]]
    with pytest.raises(ValueError, match="mixes packed rows"):
        collate([rows[0], {"input_ids": [1], "labels": [1]}], pad_id=0)


# ----------------------------------------------------------------------- batch order


def test_batches_cover_each_index_once_and_depend_only_on_seed_and_epoch():
    n, size = 103, 8
    epoch0 = list(batches(n, size, seed=5, epoch=0))
    assert len(epoch0) == steps_per_epoch(n, size) == 13
    assert [len(b) for b in epoch0] == [8] * 12 + [7]
    assert sorted(i for b in epoch0 for i in b) == list(range(n))
    assert list(batches(n, size, seed=5, epoch=0)) == epoch0
    assert list(batches(n, size, seed=5, epoch=1)) != epoch0
    assert list(batches(n, size, seed=6, epoch=0)) != epoch0
    assert sorted(i for b in batches(n, size, 5, 1) for i in b) == list(range(n))


def test_batches_resume_from_step_and_drop_last():
    full = list(batches(50, 4, seed=1, epoch=3))
    assert list(batches(50, 4, seed=1, epoch=3, start_step=9)) == full[9:]
    dropped = list(batches(50, 4, seed=1, epoch=3, drop_last=True))
    assert dropped == full[:12] and steps_per_epoch(50, 4, drop_last=True) == 12
    with pytest.raises(ValueError, match="batch_size >= 1"):
        next(batches(10, 0, seed=0, epoch=0))


def test_preprocessing_workers_encode_as_one_process_does(chat_tokenizer, monkeypatch):
    """preprocessing_num_workers: the dataset tokenized in worker processes, in contiguous parts:
    the same examples in the same order and the same cut counted as in one process; a bad row is
    named by its index in the whole dataset."""
    from fourbit.train import data

    monkeypatch.setattr(data, "MIN_ROWS_PER_WORKER", 2)  # workers for a small dataset
    monkeypatch.setattr(data.os, "cpu_count", lambda: 4)
    rows = [{"instruction": f"Say {i}.", "output": "word " * (i % 4 + 1)} for i in range(7)]
    alone, together = Truncation(), Truncation()
    expected = encode_dataset(chat_tokenizer, rows, cutoff_len=38, truncation=alone)
    assert encode_dataset(chat_tokenizer, rows, cutoff_len=38, truncation=together, workers=3) == expected
    assert together == alone and alone.answers_cut > 0  # the cut costs something, counted in every part
    conversations = [to_messages(row, "alpaca", i) for i, row in enumerate(rows)]
    conversations[5] = [{"role": "user", "content": "no answer"}]
    with pytest.raises(ValueError, match="row 5: conversation has no assistant turn"):
        encode_dataset(chat_tokenizer, conversations, cutoff_len=38, workers=3)
