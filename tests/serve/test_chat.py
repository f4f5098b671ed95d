"""The terminal chat: the conversation carries over, adapters switch, commands answer."""

import contextlib
import io

import torch
from torch import nn

import fourbit
from fourbit.cli import main
from fourbit.io.peft import load_adapter
from fourbit.nn.linear4bit import dense_weights
from fourbit.nn.lora import lora_adapters
from fourbit.serve import Sampling, generate
from fourbit.serve.adapters import AdapterSet
from fourbit.serve.chat import Chat, run


def chat_for(model, tokenizer, adapters=None, **kw):
    out = io.StringIO()
    return Chat(model, tokenizer, adapters, Sampling(max_new_tokens=6), write=out.write, **kw), out


def prompts_seen(monkeypatch):
    """Record the token ids each answer was generated from."""
    import fourbit.serve.chat as chat_module

    seen, real = [], chat_module.stream

    def spy(model, tokenizer, prompts, sampling):
        seen.append(prompts[0])
        return real(model, tokenizer, prompts, sampling)

    monkeypatch.setattr(chat_module, "stream", spy)
    return seen


def test_the_conversation_carries_over_and_reset_forgets_it(chat_model, monkeypatch):
    model, tokenizer, _ = chat_model
    seen = prompts_seen(monkeypatch)
    chat, out = chat_for(model, tokenizer)
    chat.send("Hello there")
    chat.send("And again")
    first, second = (tokenizer.decode(ids) for ids in seen)
    assert "Hello there" in first and "Hello there" in second and "And again" in second
    assert second.startswith(first)  # the second prompt extends the first exchange
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1]["content"] in out.getvalue()  # what streamed is what was kept
    chat.send("/reset")
    chat.send("Fresh start")
    assert "Hello there" not in tokenizer.decode(seen[-1])


def test_switching_adapters_changes_the_answer(chat_model, tmp_path):
    model, tokenizer, folder = chat_model
    donor, _ = fourbit.load_model(folder, compute_dtype="float32", torch_dtype="float32")
    torch.manual_seed(0)
    fourbit.add_lora(donor, r=4, alpha=64, target="all-linear", verbose=False)
    for adapter in lora_adapters(donor).values():
        nn.init.normal_(adapter.lora_B.weight, std=0.5)  # a strong adapter: the answer must change
    fourbit.save_adapter(donor, tmp_path / "loud")
    served, _ = fourbit.load_model(folder, compute_dtype="float32", torch_dtype="float32")
    adapters = AdapterSet(served)
    adapters.add("loud", tmp_path / "loud")
    chat, out = chat_for(served, tokenizer, adapters)
    chat.send("Say something")
    base_answer = chat.messages[-1]["content"]
    chat.send("/adapter loud")
    chat.send("/reset")
    chat.send("Say something")
    assert chat.messages[-1]["content"] != base_answer
    chat.send("/adapters")
    assert "*loud" in out.getvalue()
    chat.send("/adapter nope")
    assert "no adapter named 'nope'" in out.getvalue() and chat.adapter == "loud"


def test_run_reads_until_exit_or_end_of_input(chat_model):
    model, tokenizer, _ = chat_model
    chat, out = chat_for(model, tokenizer)
    lines = iter(["hi", "/bogus", "/exit", "never read"])
    run(chat, read=lambda prompt: next(lines))
    assert len(chat.messages) == 2 and "unknown command /bogus" in out.getvalue()
    chat2, _ = chat_for(model, tokenizer)
    run(chat2, read=lambda prompt: (_ for _ in ()).throw(EOFError))  # end of input: leaves quietly


def test_cli_chat_loads_adapters_and_talks(chat_model, tmp_path, monkeypatch, capsys):
    _, tokenizer, folder = chat_model
    donor, _ = fourbit.load_model(folder, compute_dtype="float32", torch_dtype="float32")
    torch.manual_seed(0)
    fourbit.add_lora(donor, r=4, alpha=64, target="all-linear", verbose=False)
    for adapter in lora_adapters(donor).values():
        nn.init.normal_(adapter.lora_B.weight, std=0.5)  # a strong adapter: the answer must change
    fourbit.save_adapter(donor, tmp_path / "a")

    # The expected replies: the model loaded as the CLI loads it (nf4, its default dtypes, the
    # dense cache on a CPU: the same arithmetic, so the same greedy tokens), with the adapter
    # applied by io/peft.py, and without it.
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                           tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    model, _ = fourbit.load_model(folder)
    on_cpu = next(model.parameters()).device.type == "cpu"
    replies = {}
    for name in ("base", "a"):
        if name == "a":
            load_adapter(model, tmp_path / "a")
        with torch.no_grad(), dense_weights(model) if on_cpu else contextlib.nullcontext():
            replies[name] = generate(model, tokenizer, [ids], Sampling(max_new_tokens=4))[0].text
    assert replies["a"] != replies["base"]  # else a CLI that ignored --adapter would pass

    lines = iter(["/adapters", "hello", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(folder), "--adapter", f"a={tmp_path / 'a'}", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "adapters: *a\n" in out and f"\n{replies['a']}\n" in out  # answered with the adapter by default


def test_cli_chat_refuses_a_malformed_adapter_spec(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["chat", "--adapter", "no-equals-sign"])
    assert "expected NAME=DIR" in capsys.readouterr().err
