"""val_size and eval_steps: the held-out split, the eval loss against a reference computed here,
where it is recorded, and a resumed run's eval points."""

import json
import sys

import pytest

from fourbit.errors import InputError
from fourbit.train import recipe
from fourbit.train.data import batches, held_out_count, split_held_out
from fourbit.train.run import run


def eval_lines(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]


def test_the_split_is_drawn_from_the_seed_disjoint_and_of_the_asked_size():
    train, held = split_held_out(20, 0.25, seed=7)
    assert (len(train), len(held)) == (15, 5) and sorted(train + held) == list(range(20))  # disjoint, complete
    assert train == sorted(train) and held == sorted(held)  # each side in dataset order
    assert split_held_out(20, 0.25, seed=7) == (train, held)  # a function of the seed alone
    assert split_held_out(20, 0.25, seed=8)[1] != held
    # a fraction rounds up; a value >= 1 is a count
    assert [held_out_count(20, v) for v in (0.0, 0.01, 0.25, 0.26, 1.0, 3.0, 19.0)] == [0, 1, 5, 6, 1, 3, 19]
    assert split_held_out(20, 0.0, seed=7) == (list(range(20)), [])
    # not the first examples of epoch 0's order: the split draws from a stream of its own
    assert held != sorted(next(batches(20, 5, seed=7, epoch=0)))


@pytest.mark.parametrize("val_size,count", [(20.0, 20), (0.99, 20), (25.0, 25)])
def test_a_val_size_that_leaves_nothing_to_train_on_is_refused(val_size, count):
    with pytest.raises(InputError) as refused:
        held_out_count(20, val_size)
    assert str(refused.value) == (
        f"config key 'val_size': {val_size:g} holds out {count} of the dataset's 20 examples, leaving {20 - count} to "
        f"train on; expected a fraction or a count that leaves at least one example on each side")


def test_the_eval_loss_is_the_held_out_responses_loss_in_eval_mode(tmp_path, config_for, chat_model, dataset,
                                                                    response_loss):
    # 8 rows, 3 held out, evaluated in batches of 2 and 1 (a mean of the batches' means would
    # weigh their tokens unequally), with LoRA dropout on (eval mode must turn it off).
    settings = dict(val_size=3, per_device_eval_batch_size=2, max_steps=4, save_steps=2, lora_dropout=0.2)
    out = tmp_path / "out"
    result = run(config_for(out, eval_steps=1, **settings))
    evals = eval_lines(out)
    assert [r["step"] for r in evals] == [1, 2, 3, 4] and all(r.keys() == {"step", "eval_loss"} for r in evals)
    assert result.eval_losses == [(r["step"], r["eval_loss"]) for r in evals]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["eval_losses"] == \
        [[r["step"], r["eval_loss"]] for r in evals[:2]]

    import fourbit

    rows = json.loads(dataset.read_text())
    _, held = split_held_out(len(rows), 3, seed=3)
    for step in (2, 4):  # the adapter as it was when evaluated: its checkpoint's
        model, _ = fourbit.load_model(chat_model, quantization="nf4", double_quant=True, blocksize=64,
                                      compute_dtype="float32")
        fourbit.load_adapter(model, out / f"checkpoint-{step}")
        per_row = [response_loss(model.eval(), [rows[i]]) for i in held]
        total, count = map(sum, zip(*per_row))
        # rel 1e-5: the same fp32 model on the same tokens, batched and padded in the run, one
        # at a time here and summed in float64 (summation order only)
        assert result.eval_losses[step - 1][1] == pytest.approx(total / count, rel=1e-5)
        # the rows' token counts differ, so a mean of batch means ([0, 1] and [2]) is another number
        batch_means = [sum(t for t, _ in part) / sum(n for _, n in part) for part in (per_row[:2], per_row[2:])]
        assert abs(sum(batch_means) / 2 - total / count) > 1e-4 * total / count

    # Evaluating changes nothing in training: the same losses with one evaluation (at the last step),
    # so each evaluation left the model in train mode (dropout on) and drew no random numbers.
    once = run(config_for(tmp_path / "once", eval_steps=4, **settings))
    assert once.losses == result.losses and once.eval_losses == [result.eval_losses[-1]]


def test_without_eval_steps_it_evaluates_at_each_save_and_the_last_step(tmp_path, config_for):
    out = tmp_path / "out"
    run(config_for(out, val_size=0.25, max_steps=5, save_steps=2, per_device_train_batch_size=2, plot_loss=True))
    assert [r["step"] for r in eval_lines(out)] == [2, 4, 5]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2, 3, 4, 4, 5, 5]  # each evaluation after its step's training line


@pytest.mark.parametrize("strategy, do_eval, steps", [
    ("epoch", False, [3, 5]),  # at the first epoch's end, and at the last step (max_steps cuts the second)
    ("no", False, []),  # held out, never evaluated (transformers' eval_strategy "no")
    ("no", True, [5]),  # do_eval: once, at the end
    ("steps", False, [3, 5]),  # every eval_steps, and the last
])
def test_eval_strategy_decides_when(tmp_path, config_for, strategy, do_eval, steps):
    """8 echo rows, 2 held out: 6 train in steps of 2, so an epoch is 3 steps; the run takes 5."""
    out = tmp_path / "out"
    run(config_for(out, val_size=2, max_steps=5, save_steps=5, eval_steps=3, per_device_train_batch_size=2,
                   eval_strategy=strategy, do_eval=do_eval))
    assert [r["step"] for r in eval_lines(out)] == steps


def test_a_resumed_run_ends_with_the_eval_points_of_the_uninterrupted_run(tmp_path, monkeypatch, config_for,
                                                                             kill_in_step):
    settings = dict(val_size=2, eval_steps=2, max_steps=8, save_steps=3, lora_dropout=0.1)
    straight = run(config_for(tmp_path / "straight", **settings))
    out = tmp_path / "resumed"
    kill_in_step(5)  # steps 1-4 recorded (evaluations at 2 and 4), checkpoint-3 on disk
    with pytest.raises(KeyboardInterrupt):
        run(config_for(out, **settings))
    assert [r["step"] for r in eval_lines(out)] == [2, 4]
    monkeypatch.undo()
    resumed = run(config_for(out, resume_from_checkpoint="latest", **settings))
    assert resumed.losses == straight.losses
    assert resumed.eval_losses == straight.eval_losses and [s for s, _ in straight.eval_losses] == [2, 4, 6, 8]
    assert eval_lines(out) == eval_lines(tmp_path / "straight")  # step 4's first evaluation was dropped, once


def test_a_val_size_too_large_is_refused_before_the_model_loads_as_the_recipe_refuses_it(tmp_path, config_for,
                                                                                         monkeypatch):
    config = config_for(tmp_path / "out", val_size=8)
    expected = ("config key 'val_size': 8 holds out 8 of the dataset's 8 examples, leaving 0 to train on; expected "
                "a fraction or a count that leaves at least one example on each side")
    from fourbit import add_lora, load_model

    model, tokenizer = load_model(config.model_name_or_path, compute_dtype="float32")
    add_lora(model, r=4)
    with pytest.raises(InputError) as by_recipe:
        recipe.train(model, tokenizer, config)
    run_module = sys.modules["fourbit.train.run"]
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(InputError) as by_preflight:
        run(config)
    assert str(by_recipe.value) == str(by_preflight.value) == expected

