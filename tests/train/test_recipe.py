"""The training recipe on a tiny random Llama with SmolLM2's tokenizer (CPU, seconds per run)."""

import json

import pytest
import torch
from safetensors import safe_open

from fourbit.train import checkpoint as checkpoint_module
from fourbit.train import recipe
from fourbit.train.config import load_config
from fourbit.train.run import run


def reference_first_loss(chat_model, dataset, response_loss, seed, batch_size):
    """The first step's loss computed independently of the recipe's data path and loss
    (conftest's response_loss): the same NF4 base the run loads (LoRA starts as a no-op), the
    first batch of the data order."""
    from fourbit import load_model
    from fourbit.train.data import batches

    model, _ = load_model(chat_model, quantization="nf4", double_quant=True, blocksize=64, compute_dtype="float32")
    rows = json.loads(dataset.read_text())
    total, count = response_loss(model, [rows[i] for i in next(batches(len(rows), batch_size, seed, 0))])
    return total / count


def test_loss_falls_and_outputs_are_written(chat_model, dataset, response_loss, tmp_path, capsys, config_for):
    result = run(config_for(tmp_path / "out", max_steps=40, save_steps=20, plot_loss=True))
    first, last = result.losses[0], sum(result.losses[-5:]) / 5
    # Guard against a loss taken over the wrong tokens (a broken mask still "goes down"): the
    # first step's loss is the base model's loss on the responses. 1e-5: the same fp32 model on
    # the same tokens, batched and padded in the run, one at a time here (summation order only).
    # Wrong tokens move it by 1-10% on this model (every token trained -0.9%, no next-token
    # shift +1.5%, <|im_end|> not trained +6.6%).
    assert first == pytest.approx(reference_first_loss(chat_model, dataset, response_loss, 3, 4), rel=1e-5)
    assert last < 0.1 * first  # the echo task is learned: the loss drops by over 10x in 40 steps
    out = tmp_path / "out"
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "training_loss.png"} <= {
        p.name for p in out.iterdir()
    }
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert all({"loss", "lr", "tokens_per_s", "epoch"} <= r.keys() for r in records)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-40"]
    assert (out / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The measured peak on a CPU, printed: the process's high-water RSS, which no moment of the
    # process since the run began can exceed (read now, from the kernel's own count).
    assert "measured peak" in capsys.readouterr().out
    with open("/proc/self/status") as f:
        rss_now = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    assert rss_now <= result.peak_memory < 16 * 2**30


def test_the_loss_counts_each_labelled_token_once_predicted_from_the_position_before():
    # A stand-in model with fixed logits: the loss must be the cross-entropy of logits[p - 1]
    # against ids[p] for each position p whose label is set, summed; nothing else counts.
    logits = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 0]])
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[0, 5], labels[1, 2] = ids[0, 3], ids[0, 5], ids[1, 2]

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, use_cache=None):
            return type("Output", (), {"logits": logits})

    loss = recipe.causal_lm_loss(Fixed(), {"input_ids": ids, "attention_mask": ids.ne(0), "labels": labels})
    expected = sum(-torch.log_softmax(logits[b, p - 1], -1)[ids[b, p]] for b, p in [(0, 3), (0, 5), (1, 2)])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # the loss takes float32 logits


def test_gradient_accumulation_gives_the_same_first_step(tmp_path, config_for):
    one = run(config_for(tmp_path / "a", max_steps=1, per_device_train_batch_size=4))
    two = run(config_for(tmp_path / "b", max_steps=1, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2))
    # Token-weighted loss over the same 4 examples: equal up to fp32 summation order.
    assert one.losses[0] == pytest.approx(two.losses[0], rel=1e-5)
    # Adam's first step moves each weight by lr g / (|g| + eps): where a gradient is within a few
    # eps (1e-8) of zero, summation order's ~1e-9 moves that update by up to ~1e-3 of lr (5e-3)
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as a, \
            safe_open(tmp_path / "b" / "adapter_model.safetensors", "pt") as b:
        for key in a.keys():
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=1e-4, atol=5e-6)


def test_compiled_layers_train_like_eager_ones(tmp_path, monkeypatch, config_for):
    settings = dict(max_steps=3, gradient_checkpointing=True)
    eager = run(config_for(tmp_path / "eager", **settings))
    compiled_layers = []

    def compile_and_record(model):
        recipe_compile(model)
        compiled_layers.extend(layer._compiled_call_impl is not None for layer in recipe.decoder_layers(model))

    recipe_compile = recipe.compile_decoder_layers
    monkeypatch.setattr(recipe, "compile_decoder_layers", compile_and_record)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = run(config_for(tmp_path / "compiled", torch_compile=True, **settings))
    # The compiled run did compile: each decoder layer, and the compiler made graphs for them.
    assert compiled_layers == [True, True]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames
    # The same float32 function, with the compiler's fused kernels summing in another order
    # (~1e-6 relative per value). Adam turns each step's gradients into updates of size ~lr
    # whatever their scale, so the later losses may drift more than the first: 1e-3 relative
    # still catches a wrong gradient (the loss moves by ~10% a step at this learning rate).
    assert compiled.losses[0] == pytest.approx(eager.losses[0], rel=1e-5)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-3)


def test_interrupted_run_resumes_with_identical_losses(tmp_path, monkeypatch, config_for):
    settings = dict(max_steps=8, save_steps=3, lora_dropout=0.1, gradient_accumulation_steps=2,
                    per_device_train_batch_size=2, optim="paged_adamw_8bit", lr_scheduler_type="cosine")
    straight = run(config_for(tmp_path / "straight", **settings))

    saved = checkpoint_module.save_checkpoint

    def save_then_crash(folder, *args, **kwargs):
        path = saved(folder, *args, **kwargs)
        if folder.name == "checkpoint-6":
            raise KeyboardInterrupt("simulated kill after checkpoint-6")
        return path

    monkeypatch.setattr(recipe, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(config_for(tmp_path / "resumed", **settings))
    monkeypatch.setattr(recipe, "save_checkpoint", saved)
    resumed = run(config_for(tmp_path / "resumed", resume_from_checkpoint="latest", **settings))
    # Dropout RNG, data position (mid-epoch), 8-bit paged optimizer and scheduler all restored:
    assert resumed.losses == straight.losses  # exactly, on CPU with a fixed seed
    with safe_open(tmp_path / "straight" / "adapter_model.safetensors", "pt") as a, \
            safe_open(tmp_path / "resumed" / "adapter_model.safetensors", "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_nan_loss_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, config_for):
    real = recipe.causal_lm_loss
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(recipe, "causal_lm_loss", poisoned)
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match=r"not finite at step 5.*Last good checkpoint: .*checkpoint-3"):
        run(config_for(out))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and all(map(lambda x: x == x, state["losses"]))


def test_a_failed_checkpoint_write_leaves_no_partial_folder(tmp_path, monkeypatch, config_for):
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if "checkpoint-6" in str(path) or ".checkpoint-6" in str(path):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        run(config_for(out))
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]


def test_bad_training_inputs_are_refused(tmp_path, config_for):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="has no rows"):
        run(config_for(tmp_path / "a", empty))
    with pytest.raises(ValueError, match=r"prompt of \d+ tokens does not fit in cutoff_len 16"):
        run(config_for(tmp_path / "b", cutoff_len=16))
    with pytest.raises(ValueError, match=r"lora_target \['qkv'\] matches no linear module"):
        run(config_for(tmp_path / "c", lora_target="qkv"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x", "output": "y"}, {"instruction": "no output"}]))
    with pytest.raises(ValueError, match=r"row 1"):
        run(config_for(tmp_path / "d", bad))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="already holds files"):
        run(config_for(tmp_path / "e"))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_split_over_ranks_scores_every_answer_in_order(monkeypatch, world_size):
    # Each rank answers every world_size-th conversation; the gathered answers must line up with
    # their conversations again. The stand-in model answers each question with its reference,
    # so any misplaced answer scores as wrong (7 conversations: the shards are uneven).
    conversations = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
                     for i in range(7)]
    monkeypatch.setattr(recipe, "greedy_answers", lambda model, tokenizer, convs, **_: [c[-1]["content"] for c in convs])

    def shard(r):
        return [c[-1]["content"] for c in conversations[r::world_size]]

    class OneOfRanks:  # Ranks.gather as every rank's call returns it
        def __init__(self, rank):
            self.rank, self.world_size, self.is_main = rank, world_size, False

        def gather(self, mine):
            assert mine == shard(self.rank)
            return [shard(r) for r in range(world_size)]

    config = load_config(None, {})
    for rank in range(world_size):
        result = recipe._evaluate(None, None, (conversations, None), config, "test", OneOfRanks(rank))
        assert result["answers"] == [f"a{i}" for i in range(7)] and result["correct"] == result["total"] == 7


def test_a_cutoff_that_cuts_most_answers_refuses_to_train(tmp_path, config_for, chat_tokenizer, caplog):
    words = "apple river stone cloud maple ember harbor violet copper meadow"
    rows = [{"instruction": "Repeat the words.", "input": words, "output": words}] * 4
    (tmp_path / "long.json").write_text(json.dumps(rows))
    messages = [{"role": "user", "content": f"Repeat the words.\n{words}"}]
    prompt_text = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = len(chat_tokenizer(prompt_text, add_special_tokens=False).input_ids)
    cutoff = prompt + 3  # 3 of each answer's 10+ tokens stay, none of its end-of-turn
    with pytest.raises(ValueError, match=rf"cutoff_len {cutoff} cuts the answers of 4 of 4 examples \(12 of \d+ answer "
                                         r"tokens are trained; 4 examples lose their final end-of-turn token.*"
                                         r"allow_truncated_answers: true"):
        run(config_for(tmp_path / "refused", tmp_path / "long.json", cutoff_len=cutoff))
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()  # refused before the first step
    with caplog.at_level("WARNING"):
        run(config_for(tmp_path / "allowed", tmp_path / "long.json", cutoff_len=cutoff, allow_truncated_answers=True,
                       max_steps=1))
    assert f"cutoff_len {cutoff} cuts the answers of 4 of 4 examples" in caplog.text  # trained, but not silently


def test_the_dataset_and_output_dir_are_checked_before_the_model_loads(tmp_path, config_for, monkeypatch):
    import sys

    run_module = sys.modules["fourbit.train.run"]  # the module (fourbit.train.run is also the name of its function)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(run_module, "load_model", no_loading)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "no output"}\n')
    with pytest.raises(ValueError, match=r"row 1"):
        run(config_for(tmp_path / "a", bad))
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: bad JSON"):
        bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": \n')
        run(config_for(tmp_path / "a", bad))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="already holds files"):
        run(config_for(tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match="holds no checkpoint-N folder"):
        run(config_for(tmp_path / "c", resume_from_checkpoint="latest"))


def test_lora_on_the_experts_of_a_moe_model_trains_and_saves_what_peft_reads(tmp_path, chat_tokenizer, dataset, config_for):
    from transformers import MixtralConfig, MixtralForCausalLM

    import fourbit
    from fourbit.nn.lora_experts import expert_lora_layers

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(chat_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=256, initializer_range=0.5, tie_word_embeddings=False)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "moe")
    chat_tokenizer.save_pretrained(tmp_path / "moe")
    experts = "mlp.experts.gate_up_proj,mlp.experts.down_proj"
    result = run(config_for(tmp_path / "out", model_name_or_path=str(tmp_path / "moe"), max_steps=30, save_steps=30,
                            lora_target="q_proj,v_proj", lora_target_parameters=experts))
    assert sum(result.losses[-5:]) / 5 < 0.3 * result.losses[0]  # the echo task is being learned
    adapter = tmp_path / "out"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["target_parameters"] == [f"model.layers.{i}.mlp.experts.{w}" for i in (0, 1)
                                          for w in ("down_proj", "gate_up_proj")]
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:  # PEFT's nesting: gate_up_proj innermost
        assert "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight" in f.keys()
        trained = f.get_tensor("base_model.model.model.layers.1.mlp.experts.lora_B.weight")
    assert trained.abs().max() > 0  # B starts at zero: down_proj's experts trained
    model, _ = fourbit.load_model(tmp_path / "moe", compute_dtype="float32")
    fourbit.load_adapter(model, adapter)
    assert len(expert_lora_layers(model)) == 4
