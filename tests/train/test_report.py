"""report_to: what each tracker is given, read back where the library is installed.

tensorboard's event files are read with tensorboard's own reader. wandb and mlflow are not
installed in the test environment: their trackers are checked against stand-in modules that
record each call, which shows what fourbit sends them (names, steps, values, the run's config),
not that the real libraries accept it.
"""

import json
import sys
import types

import numpy as np
import pytest

from fourbit.errors import InputError
from fourbit.train.report import NAMES, Reporters
from fourbit.train.run import run


def expected_scalars(out) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's lines as the trackers' scalars: name -> [(step, value)], in order."""
    scalars: dict[str, list] = {}
    for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        for key, value in record.items():
            if key != "step":
                scalars.setdefault(NAMES[key], []).append((record["step"], value))
    return scalars


def test_tensorboard_holds_each_recorded_value_once_after_a_resume(tmp_path, monkeypatch, config_for, kill_in_step):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = dict(val_size=2, eval_steps=2, max_steps=6, save_steps=3, report_to="tensorboard")
    out = tmp_path / "out"
    kill_in_step(5)  # steps 1-4 written to the event file, checkpoint-3 on disk
    with pytest.raises(KeyboardInterrupt):
        run(config_for(out, **settings))
    monkeypatch.undo()
    run(config_for(out, resume_from_checkpoint="latest", **settings))  # trains 4-6 again, purging the first 4
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    want = expected_scalars(out)
    assert set(want) == {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "train/epoch",
                         "eval/loss"}
    assert sorted(events.Tags()["scalars"]) == sorted(want)
    assert [s for s, _ in want["eval/loss"]] == [2, 4, 6] and [s for s, _ in want["train/loss"]] == list(range(1, 7))
    for name, points in want.items():
        # tensorboard stores a scalar as float32: equal once the JSON's float64 is rounded the same way
        assert [(e.step, e.value) for e in events.Scalars(name)] == [(s, float(np.float32(v))) for s, v in points], name


@pytest.mark.parametrize("tracker,module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb"),
                                            ("mlflow", "mlflow")])
def test_a_missing_tracker_library_is_refused_naming_its_extra_before_the_model_loads(tmp_path, config_for, monkeypatch,
                                                                                     tracker, module):
    monkeypatch.setitem(sys.modules, module, None)  # import then raises ImportError, as for a missing library
    run_module = sys.modules["fourbit.train.run"]
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(InputError) as refused:
        run(config_for(tmp_path / "out", report_to=tracker))
    assert str(refused.value).startswith(f"report_to: {module} cannot be imported (")
    assert str(refused.value).endswith(f"install it with pip install 'fourbit[{tracker}]'")


def test_wandb_and_mlflow_are_given_the_config_and_every_record(tmp_path, config_for, monkeypatch):
    calls = []
    wandb, mlflow = types.ModuleType("wandb"), types.ModuleType("mlflow")

    class Run:
        def log(self, metrics, step):
            calls.append(("wandb.log", dict(metrics), step))

        def finish(self):
            calls.append(("wandb.finish",))

    def init(**kwargs):
        calls.append(("wandb.init", kwargs))
        return Run()

    wandb.init = init
    mlflow.start_run = lambda run_name: calls.append(("mlflow.start_run", run_name))
    mlflow.log_params = lambda params: calls.append(("mlflow.log_params", params))
    mlflow.log_metrics = lambda metrics, step: calls.append(("mlflow.log_metrics", dict(metrics), step))
    mlflow.end_run = lambda: calls.append(("mlflow.end_run",))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setenv("WANDB_PROJECT", "echo")
    out = tmp_path / "my-run"
    config = config_for(out, report_to="wandb, mlflow", max_steps=2, save_steps=2, val_size=2)
    run(config)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sent = [({NAMES[k]: v for k, v in r.items() if k != "step"}, r["step"]) for r in records]
    # run_name defaults to output_dir's folder name
    assert calls[0] == ("wandb.init", {"project": "echo", "name": "my-run", "config": config.to_dict(), "dir": str(out)})
    assert calls[1] == ("mlflow.start_run", "my-run")
    assert calls[2] == ("mlflow.log_params", {k: str(v) for k, v in config.to_dict().items()})
    logged = calls[3:-2]
    assert [c[1:] for c in logged if c[0] == "wandb.log"] == sent == [c[1:] for c in logged if c[0] == "mlflow.log_metrics"]
    assert [r["step"] for r in records] == [1, 2, 2] and "eval/loss" in sent[-1][0]
    assert calls[-2:] == [("wandb.finish",), ("mlflow.end_run",)]  # closed when the run ends


def test_only_rank_0_reports_and_tensorboard_writes_to_logging_dir(tmp_path, config_for):
    config = config_for(tmp_path / "out", report_to="tensorboard", logging_dir=str(tmp_path / "tb"))
    assert Reporters(config, config.to_dict(), None, enabled=False).trackers == []
    reporters = Reporters(config, config.to_dict(), None)
    reporters.log({"step": 1, "loss": 2.5})
    reporters.close()
    assert [p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir()] == [True]  # logging_dir
