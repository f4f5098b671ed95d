"""A checkpoint belongs to its run; resuming, finishing and overwriting never mix two runs.

Each test kills a run where a user's would die (a KeyboardInterrupt raised from inside the
recipe) and checks what the next start does with what was left on disk.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from fourbit.train import recipe
from fourbit.train.run import run


def kill_at_step(monkeypatch, step: int) -> None:
    """The next run dies when it starts optimizer step ``step`` (its checkpoints so far are kept)."""
    real = recipe.causal_lm_loss
    seen = {"micro_batches": 0}

    def dying(model, batch):
        seen["micro_batches"] += 1
        if seen["micro_batches"] == step:  # one micro-batch per step in these configs
            raise KeyboardInterrupt(f"killed at step {step}")
        return real(model, batch)

    monkeypatch.setattr(recipe, "causal_lm_loss", dying)


def metric_steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_takes_this_runs_checkpoint_never_an_overwritten_runs(tmp_path, monkeypatch, config_for):
    out = tmp_path / "out"
    first = config_for(out, max_steps=12, save_steps=6, seed=1)
    kill_at_step(monkeypatch, 13)  # never reached: the first run ends with checkpoint-6 and -12
    run(first)
    # A new run in the same folder (overwrite_output_dir, another seed and learning rate), killed at
    # step 5 after its checkpoint-4: resuming "latest" must continue it, not the old run's 12.
    second = dict(max_steps=12, save_steps=4, seed=2, learning_rate=1e-3, overwrite_output_dir=True)
    monkeypatch.undo()
    straight = run(config_for(tmp_path / "straight", **second))
    kill_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run(config_for(out, **second))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # the old run's are gone
    monkeypatch.undo()
    resumed = run(config_for(out, resume_from_checkpoint="latest", **second))
    assert resumed.losses == straight.losses  # steps 1-4 from the checkpoint, 5-12 trained again
    assert metric_steps(out) == list(range(1, 13))  # one line per step: step 5's first try is not kept


def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path, config_for):
    run(config_for(tmp_path / "a", seed=1))
    other = config_for(tmp_path / "b", seed=2, learning_rate=1e-3, resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    with pytest.raises(ValueError, match=r"checkpoint-3 belongs to another run \(learning_rate: 0\.005 there, 0\.001 now; "
                                         r"seed: 1 there, 2 now\)"):
        run(other)
    # What a resumed run may change: where it saves and how often, reporting, evaluation
    resumed = run(config_for(tmp_path / "c", seed=1, save_steps=2, plot_loss=True,
                             resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3")))
    assert resumed.steps == 6


def test_a_run_killed_after_its_last_checkpoint_resumes_to_its_end(tmp_path, monkeypatch, config_for):
    # The cosine schedule ends at learning rate 0: the loaded optimizer state holds lr 0, which
    # must load (it was refused: "learning rate must be > 0"). Then there is nothing to train,
    # and the adapter the kill prevented is written: the last checkpoint's.
    settings = dict(lr_scheduler_type="cosine", max_steps=6, save_steps=3)
    out = tmp_path / "out"

    def killed_while_writing(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the adapter")

    monkeypatch.setattr(recipe, "_write_adapter", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        run(config_for(out, **settings))
    monkeypatch.undo()
    assert not (out / "adapter_model.safetensors").exists()
    finished = run(config_for(out, resume_from_checkpoint="latest", **settings))
    assert finished.steps == 6 and len(finished.losses) == 6
    adapter, last = load_file(out / "adapter_model.safetensors"), load_file(out / "checkpoint-6" / "adapter_model.safetensors")
    assert adapter.keys() == last.keys() and all(torch.equal(adapter[k], last[k]) for k in adapter)
    assert metric_steps(out) == list(range(1, 7))


def test_what_an_interrupted_save_left_is_cleared_and_a_stranded_checkpoint_put_back(tmp_path, config_for):
    out = tmp_path / "out"
    run(config_for(out))
    # As left by a kill inside atomic_dir: a half-written checkpoint, and checkpoint-6 moved aside
    # (to be replaced) when the kill came; and the adapter's staging folder.
    (out / ".checkpoint-9.tmp-abc").mkdir()
    (out / ".checkpoint-9.tmp-abc" / "optimizer.pt").write_bytes(b"half")
    (out / ".checkpoint-6.old-def").mkdir()
    (out / "checkpoint-6").rename(out / ".checkpoint-6.old-def" / "checkpoint-6")
    (out / ".adapter-4242").mkdir()
    (out / "notes.txt").write_text("the user's")
    resumed = run(config_for(out, resume_from_checkpoint="latest"))
    assert resumed.steps == 6  # checkpoint-6 was found again: nothing left to train
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert (out / "checkpoint-6" / "optimizer.pt").is_file() and (out / "notes.txt").read_text() == "the user's"


def test_overwriting_a_folder_keeps_files_fourbit_did_not_write(tmp_path, config_for):
    out = tmp_path / "out"
    run(config_for(out))
    (out / "notes.txt").write_text("the user's")
    (out / "runs").mkdir()  # tensorboard's default logging_dir: the old run's events go too
    (out / "runs" / "events.out.tfevents.1.host.1.0").write_bytes(b"old run")
    run(config_for(out, overwrite_output_dir=True, max_steps=2, save_steps=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"] and not (out / "runs").exists()
    assert metric_steps(out) == [1, 2] and (out / "notes.txt").read_text() == "the user's"


def test_a_checkpoint_written_before_val_size_existed_resumes(tmp_path, config_for):
    # What a checkpoint of an older fourbit holds: no eval keys in its config, no eval_losses in
    # its state. A key it lacks counts as its default there, which is how that run trained.
    out = tmp_path / "out"
    straight = run(config_for(out))
    checkpoint = out / "checkpoint-3"
    config = json.loads((checkpoint / "run_config.json").read_text())
    for key in ("val_size", "eval_steps", "per_device_eval_batch_size", "report_to", "run_name", "logging_dir"):
        del config[key]
    (checkpoint / "run_config.json").write_text(json.dumps(config))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["eval_losses"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    resumed = run(config_for(out, resume_from_checkpoint=str(checkpoint)))
    assert resumed.losses == straight.losses and resumed.eval_losses == []
    with pytest.raises(ValueError, match=r"belongs to another run \(val_size: 0\.0 there, 2\.0 now\)"):
        run(config_for(tmp_path / "other", val_size=2, resume_from_checkpoint=str(checkpoint)))


def test_save_only_model_checkpoints_hold_the_adapter_and_refuse_to_resume(tmp_path, config_for):
    """save_only_model (transformers' meaning): the adapter without the optimizer's, scheduler's and
    RNGs' states; resuming from such a checkpoint says why it cannot, and the adapter loads."""
    from fourbit.io.peft import read_adapter

    out = tmp_path / "out"
    run(config_for(out, save_only_model=True))
    kept = sorted(p.name for p in (out / "checkpoint-3").iterdir())
    assert "optimizer.pt" not in kept and "scheduler.pt" not in kept and "rng.pt" not in kept
    assert "adapter_model.safetensors" in kept and read_adapter(out / "checkpoint-3").tensors
    full = run(config_for(tmp_path / "full"))
    assert (tmp_path / "full" / "checkpoint-3" / "optimizer.pt").is_file()  # the default keeps them
    assert full.losses == run(config_for(tmp_path / "again", save_only_model=True)).losses  # training is the same
    with pytest.raises(ValueError, match="written with save_only_model: true.*cannot continue exactly"):
        run(config_for(out, resume_from_checkpoint=str(out / "checkpoint-3"), save_only_model=True))
