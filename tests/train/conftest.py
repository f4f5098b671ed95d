"""The training tests' tiny chat model, their dataset and their config."""

import json

import pytest

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
