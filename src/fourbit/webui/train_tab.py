"""The Train tab: the form, its checks and preview, and the runs (start, stop, resume, watch).

A run is ``fourbit train jobs/NAME/train.yaml`` in a process of its own (webui/jobs.py): the UI
writes the YAML, starts the command, and from then on only reads the run's folder. Stopping
signals the process; resuming starts the same command with ``resume_from_checkpoint=latest``,
which the training's own checks accept only for the run that wrote the checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import gradio as gr
import yaml

from ..errors import one_line
from ..io.atomic import atomic_file
from ..train.config import load_config
from ..train.run import preflight
from . import jobs, runs
from .jobs import check_name
from .train_form import (
    FORM,
    FORM_KEYS,
    build_config,
    config_yaml,
    default_value,
    memory_estimate,
    overrides_from_form,
    preview,
    tokenizer_of,
)


def prepare(workdir: Path, name: str, values: dict[str, Any], overwrite: bool = False):
    """(config, its YAML, a truncation warning or None): the run checked as ``fourbit train`` checks
    it before loading the model (config keys, dataset rows, output_dir, what cutoff_len cuts)."""
    name = check_name(name)
    config = build_config(overrides_from_form(values, runs.run_folder(workdir, name), overwrite))
    warning = preflight(config, tokenizer_of(config.model_name_or_path))
    return config, config_yaml(config), warning


def start_run(workdir: Path, name: str, values: dict[str, Any], overwrite: bool = False) -> jobs.Job:
    name = check_name(name)
    config, text, _ = prepare(workdir, name, values, overwrite)
    folder = runs.job_folder(workdir, name)
    if (folder / jobs.JOB_FILE).exists() and jobs.Job.load(folder).running():
        raise ValueError(f"run {name!r} is still running; stop it first")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / runs.CONFIG_FILE) as f:
        f.write(text)
    return jobs.start(folder, "train", jobs.fourbit_command("train", str(folder / runs.CONFIG_FILE)),
                      output=config.output_dir)


def resume_run(workdir: Path, name: str) -> jobs.Job:
    """The run again from its latest checkpoint (refused, with the reason, where there is none)."""
    folder = runs.job_folder(workdir, name)
    config_file = folder / runs.CONFIG_FILE
    preflight(load_config(config_file, ["resume_from_checkpoint=latest"]))
    return jobs.start(folder, "train",
                      jobs.fourbit_command("train", str(config_file), "resume_from_checkpoint=latest"),
                      output=str(runs.run_folder(workdir, name)), append_log=True)


def stop_run(workdir: Path, name: str) -> None:
    jobs.Job.load(runs.job_folder(workdir, name)).stop()


def form_values_of(workdir: Path, name: str) -> dict[str, Any]:
    """A past run's settings, to fill the form again."""
    saved = yaml.safe_load((runs.job_folder(workdir, name) / runs.CONFIG_FILE).read_text()) or {}
    values = {key: default_value(key) for key in FORM_KEYS}
    for key, value in saved.items():
        if key in values:
            values[key] = ("none" if value is None else str(value)) if key == "quantization_bit" else value
    return values


def upload_dataset(workdir: Path, path: str) -> str:
    """An uploaded file copied under WORKDIR/uploads (Gradio's own copy is temporary)."""
    target = workdir / "uploads" / Path(path).name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    return str(target)


def demo_dataset(workdir: Path) -> tuple[str, str]:
    """fourbit's built-in task (dates and unit conversions): its train and held-out files."""
    from ..demo.task import write_default_dataset

    train_file, eval_file = write_default_dataset(workdir / "datasets" / "demo")
    return str(train_file), str(eval_file)


# ------------------------------------------------------------------------------ the page

def build(workdir: Path):
    """The tab's components and events; returns the run selector (the other tabs list runs too)."""
    inputs: dict[str, gr.components.Component] = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):  # the form, its checks and what the run will be
            with gr.Row():
                name = gr.Textbox(label="run name", value="run-1", elem_id="run-name", scale=2,
                                  info=f"its folder: {workdir / 'runs'}/NAME")
                overwrite = gr.Checkbox(label="overwrite a run of that name", value=False, elem_id="overwrite")
            for group, fields in FORM:
                with gr.Accordion(group, open=True), gr.Row():
                    for field in fields:
                        inputs[field.key] = _component(field)
            with gr.Row():
                upload = gr.File(label="upload a dataset (.json, .jsonl)", file_types=[".json", ".jsonl"],
                                 elem_id="upload", height=100)
                demo = gr.Button("use the built-in demo task", elem_id="demo-task", size="sm")
            with gr.Row():
                check = gr.Button("check and preview", elem_id="check")
                start = gr.Button("start training", variant="primary", elem_id="start")
            message = gr.Markdown(elem_id="train-message")
            rows = gr.HighlightedText(label="preview: the first rows as the template renders them (masked: not "
                                            "learned; trained: learned)", elem_id="preview",
                                      color_map={"trained": "green", "masked": "gray"}, show_legend=True,
                                      combine_adjacent=True)
            with gr.Row():
                memory = gr.Code(label="memory estimate", language=None, elem_id="memory", interactive=False,
                                 max_lines=16)
                config_text = gr.Code(label="config (YAML)", language="yaml", elem_id="yaml", interactive=False,
                                      max_lines=16)
            command = gr.Textbox(label="the same run from a terminal", elem_id="command", interactive=False)
        with gr.Column(scale=2):  # the runs: one watched live
            gr.Markdown("### Runs")
            selected = gr.Dropdown(label="run", choices=runs.run_names(workdir), elem_id="runs",
                                   allow_custom_value=False)
            with gr.Row():
                stop = gr.Button("stop", elem_id="stop", size="sm")
                resume = gr.Button("resume", elem_id="resume", size="sm")
                reopen = gr.Button("load its settings", elem_id="reopen", size="sm")
            status = gr.Markdown(elem_id="run-status")
            curve = gr.Plot(label="loss", elem_id="curve", format="png")
            log = gr.Code(label="log (last lines)", language=None, elem_id="log", interactive=False,
                          max_lines=runs.LOG_LINES)
    shown = gr.State(None)  # (run, records drawn): the figure is redrawn only when it changed

    form = [inputs[k] for k in FORM_KEYS]

    def values_of(*args) -> dict[str, Any]:
        return dict(zip(FORM_KEYS, args))

    def on_check(run_name, overwrite_, *args):
        try:
            config, text, warning = prepare(workdir, run_name, values_of(*args), overwrite_)
            shown_rows = preview(config)
        except Exception as e:  # shown on the page; the UI goes on
            return _error(e), None, "", "", ""
        note = f"checked: the run can start.{f' warning: {warning}' if warning else ''}"
        return note, shown_rows, memory_estimate(config), text, _command(workdir, run_name)

    def on_start(run_name, overwrite_, *args):
        try:
            job = start_run(workdir, run_name, values_of(*args), overwrite_)
        except Exception as e:  # shown on the page; the UI goes on
            return _error(e), gr.update()
        return f"started `{job.command}`", gr.update(choices=runs.run_names(workdir), value=job.name)

    def on_stop(run_name):
        if run_name:
            stop_run(workdir, run_name)
        return gr.update()

    def on_resume(run_name):
        try:
            job = resume_run(workdir, run_name)
        except Exception as e:  # shown on the page; the UI goes on
            return _error(e)
        return f"resumed `{job.command}`"

    def on_reopen(run_name):
        values = form_values_of(workdir, run_name)
        return [gr.update(value=values[k]) for k in FORM_KEYS]

    def refresh(run_name, last):
        if not run_name:
            return "", gr.update(), "", last
        run = runs.view(workdir, run_name)
        key = (run_name, len(run.losses), len(run.eval_losses))
        figure = run.figure() if key != last else gr.update()
        return run.summary(), figure, run.log, key

    check.click(on_check, [name, overwrite, *form], [message, rows, memory, config_text, command])
    start.click(on_start, [name, overwrite, *form], [message, selected])
    stop.click(on_stop, selected, selected)
    resume.click(on_resume, selected, message)
    reopen.click(on_reopen, selected, form)
    upload.upload(lambda f: upload_dataset(workdir, f), upload, inputs["dataset"])
    demo.click(lambda: demo_dataset(workdir), None, [inputs["dataset"], inputs["eval_dataset"]])
    selected.change(refresh, [selected, gr.State(None)], [status, curve, log, shown])
    gr.Timer(1.0).tick(refresh, [selected, shown], [status, curve, log, shown])
    return selected


def latest_run(workdir: Path):
    """On page load: the run list, the newest run selected (what was shown before a reload)."""
    names = runs.run_names(workdir)
    return gr.update(choices=names, value=names[0] if names else None)


def _component(field):
    value = default_value(field.key)
    common = dict(label=field.label, info=field.info or None, elem_id=f"cfg-{field.key}")
    if field.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if field.kind == "choice":
        return gr.Dropdown(choices=list(field.choices), value=str(value), **common)
    if field.kind == "number":
        return gr.Number(value=None if value == "" else value, **common)
    return gr.Textbox(value=str(value), **common)


def _command(workdir: Path, name: str) -> str:
    return f"fourbit train {runs.job_folder(workdir, name.strip()) / runs.CONFIG_FILE}"


def _error(e: Exception) -> str:
    """The message ``fourbit train`` prints for the same input (cli.py prints ``str(e)``)."""
    return f"**error:** {one_line(e)}"
