"""A terminal chat: the conversation so far, rendered with the chat template, answered by streaming.

    fourbit chat SRC [--adapter name=DIR ...]

Each user line is added to the conversation, the whole conversation is rendered with the
tokenizer's chat template and a generation prompt, and the answer streams as it is decoded
(serve/generate.py), then joins the conversation. Lines starting with '/' are commands:

    /adapter NAME     answer with adapter NAME from now on (/adapter base: no adapter)
    /adapters         list the loaded adapters, marking the one in use
    /system TEXT      set the system prompt (and start over)
    /reset            forget the conversation
    /exit, /quit      leave (so does end of input)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

from .adapters import AdapterSet
from .generate import Sampling, stream

HELP = "commands: /adapter NAME|base, /adapters, /system TEXT, /reset, /exit"


class Chat:
    def __init__(self, model, tokenizer, adapters: AdapterSet | None = None, sampling: Sampling | None = None,
                 adapter: str | None = None, write: Callable[[str], None] | None = None):
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.sampling = sampling or Sampling(max_new_tokens=512)
        self.write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        self.system: str | None = None
        self.messages: list[dict] = []
        self.adapter: str | None = None
        if adapter is not None:
            self.command(f"/adapter {adapter}")

    def send(self, line: str) -> bool:
        """Handle one line of input; False once the user asked to leave."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            return self.command(line)
        self.messages.append({"role": "user", "content": line})
        answer = self.answer()
        self.messages.append({"role": "assistant", "content": answer})
        return True

    def answer(self) -> str:
        conversation = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        prompt = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        pieces = []
        with self.adapters.use(self.adapter) if self.adapters is not None else contextlib.nullcontext():
            for delta in stream(self.model, self.tokenizer, [ids], self.sampling):
                pieces.append(delta.text)
                self.write(delta.text)
        self.write("\n")
        return "".join(pieces)

    def command(self, line: str) -> bool:
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("exit", "quit"):
            return False
        if name == "reset":
            self.messages = []
            self.write("(conversation cleared)\n")
        elif name == "system":
            self.system, self.messages = arg or None, []
            self.write("(system prompt set; conversation cleared)\n")
        elif name == "adapters":
            names = self.adapters.names if self.adapters is not None else []
            listing = ", ".join(("*" if n == self.adapter else "") + n for n in names) or "none loaded"
            self.write(f"adapters: {listing}{'' if self.adapter else ' (in use: base)'}\n")
        elif name == "adapter":
            if arg in ("", "base", "none"):
                self.adapter = None
                self.write("(answering with the base model)\n")
            elif self.adapters is None or arg not in self.adapters.names:
                loaded = self.adapters.names if self.adapters is not None else []
                self.write(f"no adapter named {arg!r}; loaded: {loaded or 'none'}\n")
            else:
                self.adapter = arg
                self.write(f"(answering with adapter {arg})\n")
        else:
            self.write(f"unknown command /{name}; {HELP}\n")
        return True


def run(chat: Chat, read: Callable[[str], str] | None = None) -> None:
    """Read lines (with ``input`` unless given ``read``) until /exit or end of input."""
    read = read or input
    chat.write(f"fourbit chat: {HELP}\n")
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            chat.write("\n")
            return
        if not chat.send(line):
            return

