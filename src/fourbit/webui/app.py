"""``fourbit webui``: the whole loop in a browser: train, chat, evaluate, export.

    fourbit webui [--host 127.0.0.1] [--port 7860] [--auth USER:PASS] [--workdir fourbit-webui]

Built on Gradio, the UI library made for ML demos and tools (LLaMA-Factory's LlamaBoard uses it
too): its components are the ones this needs (forms, a chat that streams, live plots, file
upload, a timer for polling), it serves itself with FastAPI and uvicorn (already fourbit's
server stack), and a Python function is an event handler, so the tabs call fourbit's library
directly. It is an optional extra (``pip install 'fourbit[webui]'``).

Long work runs as ``fourbit`` commands in processes of their own (webui/jobs.py), whose state
lives in WORKDIR; the page polls it once a second. So a crash or a stop of a run never takes the
UI down, and a browser reload, or a new UI process on the same WORKDIR, shows every run again.
Chat is the exception: it answers from a model loaded in this process, through the serving engine.

The UI binds to 127.0.0.1 (this machine only) unless ``--host`` says otherwise; ``--auth`` puts a
login page in front of it. Gradio's usage analytics are off and its fonts are the system's, so the
page makes no request outside this server.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise InputError(f"--auth {text!r}: expected USER:PASS, both non-empty")
    return user, password


def build_app(workdir: str | os.PathLike):
    """The Gradio Blocks of the four tabs over ``workdir``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from . import chat_tab, command_tabs, train_tab

    workdir = Path(workdir).resolve()
    (workdir / "jobs").mkdir(parents=True, exist_ok=True)
    chat = chat_tab.ChatModel()
    with gr.Blocks(title="fourbit", analytics_enabled=False) as app:
        gr.Markdown(f"## fourbit: QLoRA fine-tuning on hardware you can afford\nworking folder: `{workdir}`")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Train", elem_id="tab-train"):
                selected = train_tab.build(workdir)
            with gr.Tab("Chat", elem_id="tab-chat") as chat_page:
                chat_adapter, _ = chat_tab.build(workdir, chat)
            with gr.Tab("Evaluate", elem_id="tab-evaluate") as evaluate_page:
                eval_adapter = command_tabs.build_evaluate(workdir)
            with gr.Tab("Export", elem_id="tab-export") as export_page:
                export_adapter = command_tabs.build_export(workdir)
        app.load(lambda: train_tab.latest_run(workdir), None, selected)
        # each tab lists the runs with an adapter as it is opened (a run may have finished since)
        for page, dropdown in ((chat_page, chat_adapter), (evaluate_page, eval_adapter), (export_page, export_adapter)):
            page.select(lambda: gr.update(choices=chat_tab.adapter_choices(workdir)), None, dropdown)
    app.chat = chat  # the loaded model, for whoever closes the app
    return app


def theme():
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


def launch(workdir: str | os.PathLike = "fourbit-webui", host: str = "127.0.0.1", port: int = 7860,
           auth: str | None = None, block: bool = True):
    """Serve the UI; ``block=False`` returns the running app (tests)."""
    credentials = parse_auth(auth)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise InputError("the web UI needs Gradio: pip install 'fourbit[webui]'") from None
    app = build_app(workdir)
    app.queue(default_concurrency_limit=4)
    # allowed_paths: the files the page shows (the compare plot) are under the working folder
    app.launch(server_name=host, server_port=port, auth=credentials, prevent_thread_lock=not block, quiet=not block,
               theme=theme(), ssr_mode=False, footer_links=[], show_error=True,
               allowed_paths=[str(Path(workdir).resolve())])
    return app
