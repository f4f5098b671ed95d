"""The training tests' tiny chat model, their dataset and their config."""

import json

import pytest
import torch

from fourbit.train.config import load_config


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory, chat_tokenizer, make_tiny_llama):
    """A tiny Llama whose vocabulary is SmolLM2's, saved with that tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-chat")
    # A wide initializer gives the random lm_head rows enough norm to express a peaked output
    # distribution; at the default 0.02 a 64-wide model cannot get far below ln(vocab).
    make_tiny_llama(folder, vocab_size=len(chat_tokenizer), max_position_embeddings=256, initializer_range=0.5)
    chat_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """Alpaca rows: echo a few words back (learnable by a tiny model in a few dozen steps)."""
    words = ["apple", "river", "stone", "cloud", "maple", "ember", "harbor", "violet"]
    rows = [{"instruction": "Repeat the word.", "input": w, "output": w} for w in words]
    path = tmp_path_factory.mktemp("data") / "echo.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture
def config_for(chat_model, dataset):
    """``config_for(output_dir, dataset=None, **overrides)``: a quick float32 run of the tiny chat
    model on the echo dataset (6 steps, a checkpoint every 3)."""
    def make(out, dataset_path=None, **overrides):
        settings = {
            "model_name_or_path": str(chat_model), "dataset": str(dataset_path or dataset), "output_dir": str(out),
            "compute_dtype": "float32", "lora_rank": 8, "learning_rate": 5e-3, "lr_scheduler_type": "constant",
            "per_device_train_batch_size": 4, "max_steps": 6, "save_steps": 3, "cutoff_len": 64, "seed": 3,
            "gradient_checkpointing": False, "plot_loss": False,
        }
        return load_config(None, settings | overrides)

    return make


@pytest.fixture(scope="session")
def response_loss(chat_tokenizer):
    """``response_loss(model, rows)``: (summed cross-entropy, token count) of alpaca ``rows``'
    responses and their closing <|im_end|>, computed independently of the recipe's data path and
    loss: one conversation at a time, the response located by tokenizing prompt and conversation
    ourselves, the model's logits (in its own dtype) summed in float64."""
    end_of_turn = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")

    def loss(model, rows) -> tuple[float, int]:
        total, count = 0.0, 0
        for row in rows:
            messages = [{"role": "user", "content": f"{row['instruction']}\n{row['input']}"},
                        {"role": "assistant", "content": row["output"]}]
            prompt = chat_tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
            full = chat_tokenizer.apply_chat_template(messages, tokenize=False)
            prompt_ids = chat_tokenizer(prompt, add_special_tokens=False).input_ids
            ids = chat_tokenizer(full, add_special_tokens=False).input_ids
            end = ids.index(end_of_turn, len(prompt_ids)) + 1
            with torch.no_grad():
                logits = model(torch.tensor([ids[:end]])).logits[0].double()
            targets = torch.tensor(ids[len(prompt_ids) : end])
            total += torch.nn.functional.cross_entropy(logits[len(prompt_ids) - 1 : end - 1], targets, reduction="sum").item()
            count += len(targets)
        return total, count

    return loss


@pytest.fixture
def kill_in_step(monkeypatch):
    """``kill_in_step(n)``: the next run dies in optimizer step n, after its training (the
    gradient's clipping), before the step is recorded; steps 1 to n-1 and their checkpoints and
    evaluations are kept. Undo with ``monkeypatch.undo()``."""
    from fourbit.train import recipe

    def arm(step: int) -> None:
        real, seen = recipe.clip_grad_norm, {"steps": 0}

        def dying(*args):
            seen["steps"] += 1
            if seen["steps"] == step:
                raise KeyboardInterrupt(f"killed in step {step}")
            return real(*args)

        monkeypatch.setattr(recipe, "clip_grad_norm", dying)

    return arm
