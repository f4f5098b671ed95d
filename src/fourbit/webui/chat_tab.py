"""The Chat tab: one 4-bit base, any adapter of any run, answers streamed by the serving engine.

The model is loaded in the UI's process, on a thread of its own (serve/engine.py on_own_thread:
the engine's worker alone computes), and every answer is a request to the engine
(serve/engine.py): the conversation rendered with the chat template, submitted with its sampling
settings and adapter, its text read as it is decoded. The adapter is chosen per message, so a
conversation can switch mid-way; a run's adapter is loaded into the engine the first time it is
chosen, and again when its file has changed since (the run was trained further).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from ..errors import one_line
from ..io.peft import WEIGHTS_FILE
from ..serve.adapters import AdapterSet
from ..serve.engine import Engine, on_own_thread, results
from ..serve.generate import Completion, Sampling
from . import runs

BASE = "base (no adapter)"


class ChatModel:
    """The loaded base and its engine; one per UI process, shared by the browser tabs."""

    def __init__(self):
        self.engine: Engine | None = None
        self.source: str | None = None
        self._versions: dict[str, float] = {}  # adapter name -> its weights' mtime when loaded
        self._lock = threading.Lock()

    def load(self, source: str | None, quantization: str = "nf4") -> str:
        from ..io.loader import load_model

        with self._lock:
            if self.engine is not None:
                self.engine.close()
                self.engine = None
            model, tokenizer = on_own_thread(
                lambda: load_model(source or None, quantization=None if quantization == "none" else quantization))
            self.engine = Engine(model, tokenizer, AdapterSet(model), max_batch=8)
            self.source, self._versions = source or None, {}
        return f"loaded {source or 'SmolLM2-135M-Instruct (embedded)'} ({quantization})"

    def use(self, name: str, folder: Path) -> None:
        """Load run ``name``'s adapter into the engine unless its current version is there (under
        the lock: two browser tabs choosing it at once load it once)."""
        with self._lock:
            mtime = (folder / WEIGHTS_FILE).stat().st_mtime
            if self._versions.get(name) == mtime:
                return
            if name in self._versions:
                self.engine.unload_adapter(name)
            self.engine.load_adapter(name, folder)
            self._versions[name] = mtime

    def answer(self, conversation: list[dict], adapter: str | None, sampling: Sampling) -> Iterator[str]:
        """The answer's text so far, after each decoded piece."""
        tokenizer = self.engine.tokenizer
        prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ticket = self.engine.submit(ids, sampling, adapter)
        text = ""
        try:
            for _, item in results(ticket.out, 1):
                if not isinstance(item, Completion):
                    text += item.text
                    yield text
        finally:
            ticket.cancel()  # the browser left mid-answer: the row stops at the next step


def adapter_choices(workdir: Path) -> list[str]:
    """The base, and every run that has written an adapter (finished, or stopped after its first save)."""
    return [BASE] + [name for name in runs.run_names(workdir)
                     if (runs.run_folder(workdir, name) / WEIGHTS_FILE).is_file()]


def _text(content) -> str:
    """A chat message's text (Gradio gives a string, or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def build(workdir: Path, chat: ChatModel):
    with gr.Row():
        source = gr.Textbox(label="base model", placeholder="empty: the embedded SmolLM2-135M-Instruct",
                            elem_id="chat-model", scale=3)
        quantization = gr.Dropdown(label="load as", choices=["nf4", "fp4", "int4", "none"], value="nf4",
                                   elem_id="chat-quantization")
        load = gr.Button("load", elem_id="chat-load")
    loaded = gr.Markdown("no model loaded", elem_id="chat-status")
    with gr.Row():
        adapter = gr.Dropdown(label="adapter (switch any time)", choices=adapter_choices(workdir), value=BASE,
                              elem_id="chat-adapter", scale=2)
        refresh = gr.Button("refresh list", size="sm", elem_id="chat-refresh")
    system = gr.Textbox(label="system prompt", elem_id="chat-system")
    with gr.Accordion("sampling", open=True), gr.Row():
        temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0: greedy)", elem_id="chat-temperature")
        top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="top p")
        top_k = gr.Number(value=0, label="top k (0: off)", precision=0)
        max_new = gr.Number(value=256, label="max new tokens", precision=0, elem_id="chat-max-new")
        seed = gr.Number(value=None, label="seed", precision=0)
    bot = gr.Chatbot(label="chat", elem_id="chatbot", height=360)
    with gr.Row():
        box = gr.Textbox(label="message", elem_id="chat-input", scale=4)
        send = gr.Button("send", variant="primary", elem_id="chat-send")
        clear = gr.Button("clear", elem_id="chat-clear")

    def on_load(src, quant):
        try:
            return chat.load(src.strip() or None, quant)
        except Exception as e:  # shown on the page; the UI goes on
            return f"**error:** {one_line(e)}"

    def on_send(message, history, name, system_prompt, temp, p, k, new, seed_):
        history = list(history or [])
        if chat.engine is None:
            gr.Warning("load a model first")
            yield history, message
            return
        conversation = ([{"role": "system", "content": system_prompt}] if system_prompt.strip() else [])
        conversation += [{"role": m["role"], "content": _text(m["content"])} for m in history]
        conversation.append({"role": "user", "content": message})
        try:
            chosen = None
            if name and name != BASE:
                chat.use(name, runs.run_folder(workdir, name))
                chosen = name
            sampling = Sampling(max_new_tokens=int(new or 256), temperature=float(temp), top_p=float(p),
                                top_k=int(k or 0), seed=None if seed_ in (None, "") else int(seed_))
        except Exception as e:  # shown on the page; the UI goes on
            gr.Warning(one_line(e))
            yield history, message
            return
        history.append({"role": "user", "content": message})
        history.append({"role": "assistant", "content": ""})
        yield history, ""
        for text in chat.answer(conversation, chosen, sampling):
            history[-1] = {"role": "assistant", "content": text}
            yield history, ""

    load.click(on_load, [source, quantization], loaded)
    refresh.click(lambda: gr.update(choices=adapter_choices(workdir)), None, adapter)
    send_inputs = [box, bot, adapter, system, temperature, top_p, top_k, max_new, seed]
    send.click(on_send, send_inputs, [bot, box])
    box.submit(on_send, send_inputs, [bot, box])
    clear.click(lambda: [], None, bot)
    return adapter, loaded
