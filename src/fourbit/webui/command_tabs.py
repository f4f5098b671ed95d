"""The Evaluate and Export tabs: forms that run one ``fourbit`` command each, as a job.

Each button builds the command line a user would type (shown with the job), and the job runs it
in its own process (webui/jobs.py); the tab shows its state, the log's last lines (the command's
own progress bars and tables) and, once it has finished, what it wrote. The command checks its
own input, so a refusal reads exactly as in a terminal (the job's last log line).

    Evaluate   perplexity   fourbit eval SRC [--adapter DIR] --perplexity FILE --context N
               compare      fourbit compare SRC --methods ... --group-size N --plot compare.png [--perplexity FILE]
               harness      fourbit eval SRC [--adapter DIR] --tasks ... [--limit N] --output results.json
    Export     merge        fourbit merge --base SRC --adapter DIR --output DIR [--requantize nf4]
               quantize     fourbit quantize SRC --method M --output DIR
               gguf         fourbit export SRC [--adapter DIR] --quant Q --output FILE.gguf
"""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from ..errors import one_line
from . import jobs, runs
from .chat_tab import BASE, adapter_choices

EVALUATE_KINDS = ("perplexity", "compare", "harness")
EXPORT_KINDS = ("merge", "quantize", "gguf")
COMPARE_METHODS = ("bf16", "nf4", "nf4-dq", "fp4", "int4-rtn", "gptq", "awq", "int8")
QUANTIZE_METHODS = ("nf4", "fp4", "gptq", "awq", "rtn", "int8")
LOG_LINES = 20  # the log's last lines a tab shows, all in view
GGUF_TYPES = ("q8_0", "q4_k_m", "q5_k_m", "q6_k", "q4_0", "f16", "bf16")


def evaluate_command(kind: str, workdir: Path, folder: Path, source: str, adapter: str, text_file: str,
                     context: int, methods: list[str], group_size: int, tasks: str, limit: float | None
                     ) -> tuple[list[str], str | None]:
    """(fourbit's arguments, the file it writes) for one Evaluate job."""
    src = [source] if source else []
    with_adapter = ["--adapter", str(runs.run_folder(workdir, adapter))] if adapter and adapter != BASE else []
    if kind == "perplexity":
        return ["eval", *src, *with_adapter, "--perplexity", text_file, "--context", str(int(context))], None
    if kind == "compare":
        plot = str(folder / "compare.png")
        return (["compare", *src, "--methods", ",".join(methods), "--group-size", str(int(group_size)), "--plot", plot]
                + (["--perplexity", text_file] if text_file else []) + ["--context", str(int(context))]), plot
    output = str(folder / "results.json")
    return (["eval", *src, *with_adapter, "--tasks", tasks, "--output", output]
            + (["--limit", f"{limit:g}"] if limit else [])), output


def export_command(kind: str, workdir: Path, source: str, adapter: str, name: str, method: str,
                   gguf_type: str) -> tuple[list[str], str]:
    """(fourbit's arguments, the folder or file it writes) for one Export job."""
    src = [source] if source else []
    name = jobs.check_name(name, "output name")
    adapter_dir = str(runs.run_folder(workdir, adapter)) if adapter and adapter != BASE else None
    if kind == "merge":
        if adapter_dir is None:
            raise ValueError("merge: choose the adapter (a run) to merge into its base")
        output = str(workdir / "exports" / name)
        return (["merge", "--base", source, "--adapter", adapter_dir, "--output", output] if source
                else ["merge", "--adapter", adapter_dir, "--output", output]) + (
                    ["--requantize", method] if method in ("nf4", "fp4") else []), output
    if kind == "quantize":
        output = str(workdir / "exports" / name)
        return ["quantize", source or "default", "--method", method, "--output", output], output
    output = str(workdir / "exports" / (name if name.endswith(".gguf") else f"{name}.gguf"))
    return ["export", *src, *(["--adapter", adapter_dir] if adapter_dir else []), "--quant", gguf_type,
            "--output", output], output


def start_command(workdir: Path, kind: str, build) -> jobs.Job:
    """``build(folder) -> (args, output)``, run as a new job of ``kind``."""
    folder = workdir / "jobs" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 1000:03d}"
    args, output = build(folder)
    return jobs.start(folder, kind, jobs.fourbit_command(*args), output=output)


def latest(workdir: Path, kinds: tuple[str, ...]) -> jobs.Job | None:
    found = [job for job in jobs.jobs(workdir / "jobs") if job.kind in kinds]
    return found[0] if found else None


def shown(job: jobs.Job | None) -> tuple[str, str]:
    """(the job's summary, its log's last lines), from one read of its folder."""
    if job is None:
        return "no job yet", ""
    status = job.status(LOG_LINES)
    lines = [f"**{job.kind}**: {status.state}", f"`{job.command}`"]
    if status.state == "finished" and job.output:
        lines.append(f"output: `{job.output}`")
    if status.error:
        lines.append(f"**error:** `{status.error}`")
    return "\n\n".join(lines), status.log


def _panel(prefix: str):
    status = gr.Markdown("no job yet", elem_id=f"{prefix}-status")
    with gr.Row():
        stop = gr.Button("stop", size="sm", elem_id=f"{prefix}-stop")
    log = gr.Code(label="log (last lines)", language=None, elem_id=f"{prefix}-log", interactive=False,
                  max_lines=LOG_LINES)
    return status, stop, log


def build_evaluate(workdir: Path):
    with gr.Row():
        source = gr.Textbox(label="model", placeholder="empty: the embedded SmolLM2-135M-Instruct", elem_id="eval-model",
                            scale=2)
        adapter = gr.Dropdown(label="adapter", choices=adapter_choices(workdir), value=BASE, elem_id="eval-adapter")
    with gr.Tab("perplexity"):
        with gr.Row():
            text_file = gr.Textbox(label="text file (.txt, or .jsonl with a 'text' field)", elem_id="eval-text", scale=3)
            context = gr.Number(value=512, label="context (tokens per window)", precision=0, elem_id="eval-context")
        perplexity = gr.Button("perplexity", variant="primary", elem_id="eval-perplexity")
    with gr.Tab("compare quantization methods"):
        methods = gr.CheckboxGroup(list(COMPARE_METHODS), value=["bf16", "nf4", "nf4-dq", "fp4", "int4-rtn"],
                                   label="methods (on the model without adapter; text: the file above, or Python's "
                                         "documentation)", elem_id="eval-methods")
        group_size = gr.Number(value=128, precision=0, label="group size (int4-rtn, gptq, awq; -1: one per row)",
                               elem_id="eval-group-size")
        compare = gr.Button("compare", variant="primary", elem_id="eval-compare")
    with gr.Tab("lm-evaluation-harness"):
        with gr.Row():
            tasks = gr.Textbox(label="tasks (names or YAML files, comma-separated)", value="arc_easy", elem_id="eval-tasks")
            limit = gr.Number(value=None, label="documents per task (for a try, not numbers to quote)",
                              elem_id="eval-limit")
        harness = gr.Button("run tasks", variant="primary", elem_id="eval-harness")
    status, stop, log = _panel("eval")
    plot = gr.Image(label="perplexity against bits per parameter", elem_id="eval-plot", type="filepath", height=420,
                    visible=False)

    def run(kind):
        def go(src, name, text, ctx, chosen, group, task_names, limit_):
            return _started(workdir, kind, EVALUATE_KINDS, lambda folder: evaluate_command(
                kind, workdir, folder, src.strip(), name, text.strip(), ctx or 512, chosen, group or 128, task_names,
                limit_))
        return go

    inputs = [source, adapter, text_file, context, methods, group_size, tasks, limit]
    for button, kind in zip((perplexity, compare, harness), EVALUATE_KINDS, strict=True):
        button.click(run(kind), inputs, status)
    stop.click(lambda: _stop(latest(workdir, EVALUATE_KINDS)), None, None)

    def refresh():
        job = latest(workdir, EVALUATE_KINDS)
        image = job.output if job and job.kind == "compare" and Path(job.output or "").is_file() else None
        return *shown(job), gr.update(value=image, visible=image is not None)

    gr.Timer(1.0).tick(refresh, None, [status, log, plot])
    return adapter


def build_export(workdir: Path):
    with gr.Row():
        source = gr.Textbox(label="base model", placeholder="empty: the embedded SmolLM2-135M-Instruct",
                            elem_id="export-model", scale=2)
        adapter = gr.Dropdown(label="adapter", choices=adapter_choices(workdir), value=BASE, elem_id="export-adapter")
        name = gr.Textbox(label="output name (under exports/)", value="merged", elem_id="export-name")
    with gr.Row():
        merge_as = gr.Dropdown(label="merge: write", choices=["bf16", "nf4", "fp4"], value="bf16",
                               info="bf16: a plain folder; nf4/fp4: requantized (bnb-4bit)", elem_id="export-merge-as")
        merge = gr.Button("merge adapter into base", variant="primary", elem_id="export-merge")
    with gr.Row():
        method = gr.Dropdown(label="quantize: method", choices=list(QUANTIZE_METHODS), value="nf4",
                             elem_id="export-method")
        quantize = gr.Button("quantize the base", elem_id="export-quantize")
    with gr.Row():
        gguf_type = gr.Dropdown(label="GGUF: weight type", choices=list(GGUF_TYPES), value="q8_0",
                                elem_id="export-gguf-type")
        gguf = gr.Button("export GGUF (adapter merged)", elem_id="export-gguf")
    status, stop, log = _panel("export")

    def run(kind):
        def go(src, adapter_, name_, merge_as_, method_, gguf_type_):
            chosen = merge_as_ if kind == "merge" else method_
            return _started(workdir, kind, EXPORT_KINDS, lambda folder: export_command(
                kind, workdir, src.strip(), adapter_, name_.strip(), chosen, gguf_type_))
        return go

    inputs = [source, adapter, name, merge_as, method, gguf_type]
    for button, kind in zip((merge, quantize, gguf), EXPORT_KINDS, strict=True):
        button.click(run(kind), inputs, status)
    stop.click(lambda: _stop(latest(workdir, EXPORT_KINDS)), None, None)

    def refresh():
        return shown(latest(workdir, EXPORT_KINDS))

    gr.Timer(1.0).tick(refresh, None, [status, log])
    return adapter


def _started(workdir: Path, kind: str, kinds: tuple[str, ...], build) -> str:
    """Start ``build``'s command as a job of ``kind``: the tab's status, or why it was refused."""
    try:
        start_command(workdir, kind, build)
    except Exception as e:  # shown on the page; the UI goes on
        return f"**error:** {one_line(e)}"
    return shown(latest(workdir, kinds))[0]


def _stop(job: jobs.Job | None) -> None:
    if job is not None:
        job.stop()
