"""Instruction datasets as files or on the hub: rows, their layouts (alpaca, sharegpt, openai), and LLaMA-Factory's
registry of named datasets (``dataset_info.json``) -> conversations. train/data.py turns the
conversations into tokens; GPTQ/AWQ calibration and perplexity read the same files.

**Rows and formats.** A dataset is a ``.json`` file holding a list of objects or a ``.jsonl``
file with one object per line. Each row is converted to a conversation, a list of
``{"role": "system"|"user"|"assistant", "content": str}``, from one of three layouts (the ones
LLaMA-Factory users know):

- alpaca: ``instruction``, optional ``input`` (appended to the instruction after a newline),
  ``output``, optional ``system``, optional ``history`` (earlier ``[question, answer]`` pairs).
- sharegpt: ``conversations``, a list of ``{"from": ..., "value": ...}`` with roles
  ``human``/``user``, ``gpt``/``assistant`` and ``system``; optional ``system`` column.
- openai: ``messages``, a list of ``{"role": ..., "content": str}`` with roles
  ``system``/``user``/``assistant``.

A file given by path has its format detected from its first row (``messages`` -> openai,
``conversations`` -> sharegpt, ``instruction`` -> alpaca); every row is then checked against
that format. A conversation is an optional system message first, then user and assistant turns
alternating, starting with user and ending with assistant; contents are non-empty strings.

**Registry.** ``resolve_dataset("a,b", dataset_dir)`` looks each comma-separated name up in
``dataset_dir/dataset_info.json``, LLaMA-Factory's layout. Supported keys of an entry:
``file_name`` (relative to dataset_dir) or ``hf_hub_url`` (a dataset on the Hugging Face hub, read
by io/hub_datasets.py, with ``subset``, ``split`` (default ``train``) and ``folder``),
``formatting`` (``alpaca``, the default, ``sharegpt``, or fourbit's ``openai``), ``columns``
(alpaca: prompt, query, response, system, history; sharegpt/openai: messages, system), ``tags``
(role_tag, content_tag, user_tag, assistant_tag, system_tag; observation_tag and function_tag are
accepted but rows using those roles are rejected) and ``num_samples`` (that many rows drawn at
random, without repeats until every row is taken, as LLaMA-Factory samples them; seeded). Not
supported, and an error when present: ModelScope, Modelers and script sources (ms_hub_url alone,
om_hub_url, script_url, cloud_file_name), folders, preference data (``ranking: true``,
chosen/rejected, kto_tag), tools and function calls, images/videos/audios. A spec that is not a
registered name is read as a file path, and failing that, when it looks like ``org/name``, as a
hub dataset. ``max_samples`` then keeps each dataset's first rows (LLaMA-Factory's meaning).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from .hub_datasets import load_hub_rows

FORMATS = ("alpaca", "sharegpt", "openai")
_DETECT_KEYS = {"messages": "openai", "conversations": "sharegpt", "instruction": "alpaca"}

_DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output",
               "system": "system", "history": "history"},
    "sharegpt": {"messages": "conversations", "system": "system"},
    "openai": {"messages": "messages", "system": "system"},
}
_DEFAULT_TAGS = {
    "sharegpt": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                 "assistant_tag": "gpt", "system_tag": "system"},
    "openai": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
               "assistant_tag": "assistant", "system_tag": "system"},
}
_IGNORED_TAGS = {"observation_tag", "function_tag"}
_ENTRY_KEYS = ("file_name", "hf_hub_url", "subset", "split", "folder", "num_samples", "formatting", "columns", "tags")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class DatasetFormat:
    """A format plus LLaMA-Factory-style column and tag renames (defaults filled in)."""

    formatting: str
    columns: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, formatting: str, columns: Mapping | None = None, tags: Mapping | None = None):
        if formatting not in FORMATS:
            raise InputError(f"unknown formatting {formatting!r}; allowed: {', '.join(FORMATS)}")
        columns, tags = dict(columns or {}), dict(tags or {})
        allowed = _DEFAULT_COLUMNS[formatting]
        for key in columns:
            if key not in allowed:
                raise InputError(f"column {key!r} is not supported for {formatting} data; "
                                 f"supported: {', '.join(allowed)}")
        allowed_tags = _DEFAULT_TAGS.get(formatting, {})
        for key in tags:
            if key not in allowed_tags and not (allowed_tags and key in _IGNORED_TAGS):
                raise InputError(f"tag {key!r} is not supported for {formatting} data; "
                                 f"supported: {', '.join(allowed_tags) or 'none'}")
        tags = {k: v for k, v in tags.items() if k not in _IGNORED_TAGS}
        return cls(formatting, allowed | columns, allowed_tags | tags)


# ---------------------------------------------------------------------------------- rows


def load_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``.json`` (a list of objects) or ``.jsonl`` (an object per line) file."""
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        raise InputError(f"dataset file {path} must end in .json or .jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {number}: bad JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise InputError(f"{path} line {number}: expected a JSON object, "
                                 f"got {type(row).__name__}")
            rows.append(row)
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {e.lineno}: bad JSON ({e.msg})") from e
        if not isinstance(rows, list):
            raise InputError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise InputError(f"{path} row {index}: expected a JSON object, "
                                 f"got {type(row).__name__}")
    if not rows:
        raise InputError(f"dataset {path} has no rows")
    return rows


def detect_format(rows: Sequence[Mapping], name: str = "dataset") -> str:
    """``openai``, ``sharegpt`` or ``alpaca``, from the keys of the first row."""
    if not rows:
        raise InputError(f"dataset {name} has no rows")
    first = rows[0]
    for key, fmt in _DETECT_KEYS.items():
        if isinstance(first, Mapping) and key in first:
            return fmt
    keys = sorted(first) if isinstance(first, Mapping) else type(first).__name__
    raise InputError(
        f"dataset {name}: cannot tell the format of row 0 (keys {keys}); expected 'messages' "
        "(openai), 'conversations' (sharegpt) or 'instruction' + 'output' (alpaca), or register "
        "the file in dataset_info.json with its columns"
    )


def to_messages(row: Mapping, fmt: str | DatasetFormat, index: int) -> list[dict]:
    """Row ``index`` as ``[{"role", "content"}, ...]``; ValueError naming the row if malformed."""
    fmt = fmt if isinstance(fmt, DatasetFormat) else DatasetFormat.of(fmt)
    if not isinstance(row, Mapping):
        raise InputError(f"row {index} ({fmt.formatting} format): expected an object, "
                         f"got {type(row).__name__}")
    if fmt.formatting == "alpaca":
        return _alpaca_messages(row, fmt, index)
    return _conversation_messages(row, fmt, index)


def _fail(index: int, fmt: DatasetFormat, problem: str, expected: str) -> InputError:
    return InputError(f"row {index} ({fmt.formatting} format): {problem}; expected {expected}")


def _alpaca_messages(row: Mapping, fmt: DatasetFormat, index: int) -> list[dict]:
    col = fmt.columns
    expected = (f"'{col['prompt']}' (string), optional '{col['query']}' (string), "
                f"'{col['response']}' (non-empty string), optional '{col['system']}' (string), "
                f"optional '{col['history']}' (list of [question, answer] string pairs)")

    def text(key: str, required: bool) -> str:
        value = row.get(col[key])
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            problem = (f"missing '{col[key]}'" if col[key] not in row
                       else f"'{col[key]}' is {type(value).__name__}")
            raise _fail(index, fmt, problem, expected)
        return value

    prompt = "\n".join(part for part in (text("prompt", True), text("query", False)) if part)
    response = text("response", True)
    if not prompt.strip():
        raise _fail(index, fmt, f"'{col['prompt']}' and '{col['query']}' are both empty", expected)
    if not response.strip():
        raise _fail(index, fmt, f"'{col['response']}' is empty (no assistant turn)", expected)
    messages = []
    if system := text("system", False):
        messages.append({"role": "system", "content": system})
    history = row.get(col["history"]) or []
    if not isinstance(history, list):
        raise _fail(index, fmt, f"'{col['history']}' is {type(history).__name__}", expected)
    for turn, pair in enumerate(history):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(p, str) and p.strip() for p in pair)):
            raise _fail(index, fmt, f"'{col['history']}' item {turn} is not a pair of non-empty "
                        "strings", expected)
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _conversation_messages(row: Mapping, fmt: DatasetFormat, index: int) -> list[dict]:
    col, tags = fmt.columns, fmt.tags
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    roles = {}
    for canonical in ("user", "assistant", "system"):
        roles[tags[f"{canonical}_tag"]] = canonical
        roles[canonical] = canonical
    expected = (f"'{col['messages']}': a list of {{'{role_tag}': role, '{content_tag}': string}}, "
                "an optional system message first, then user and assistant turns alternating, "
                f"user first, assistant last (roles: {', '.join(sorted(roles))})")
    turns = row.get(col["messages"])
    if not isinstance(turns, list) or not turns:
        problem = (f"missing '{col['messages']}'" if col["messages"] not in row
                   else f"'{col['messages']}' is not a non-empty list")
        raise _fail(index, fmt, problem, expected)
    messages = []
    for position, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or role_tag not in turn or content_tag not in turn:
            raise _fail(index, fmt, f"message {position} has no '{role_tag}'/'{content_tag}'",
                        expected)
        role, content = roles.get(turn[role_tag]), turn[content_tag]
        if role is None:
            raise _fail(index, fmt, f"message {position} has unsupported role {turn[role_tag]!r}",
                        expected)
        if not isinstance(content, str) or not content.strip():
            raise _fail(index, fmt, f"message {position} content is not a non-empty string",
                        expected)
        messages.append({"role": role, "content": content})
    system = row.get(col["system"])
    if messages[0]["role"] != "system" and isinstance(system, str) and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not any(m["role"] == "assistant" for m in body):
        raise _fail(index, fmt, "no assistant turn", expected)
    for position, message in enumerate(body):
        want = "user" if position % 2 == 0 else "assistant"
        if message["role"] != want:
            raise _fail(index, fmt, f"turn {position} after the system message is "
                        f"{message['role']}, not {want} (roles must alternate)", expected)
    if body[-1]["role"] != "assistant":
        raise _fail(index, fmt, "the last turn is user, not assistant", expected)
    return messages


# ------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class DatasetSource:
    """Where one dataset's rows come from: a local file or a hub dataset, with its format (None:
    detected from the first row) and how many rows to draw (``num_samples``)."""

    name: str
    file: Path | None = None
    hub: str | None = None
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    fmt: DatasetFormat | None = None
    num_samples: int | None = None

    def rows(self) -> list[dict]:
        if self.file is not None:
            return load_rows(self.file)
        return load_hub_rows(self.hub, self.subset, self.split, self.folder)

    def __str__(self) -> str:
        return str(self.file) if self.file is not None else f"hub {self.hub}"


def resolve_dataset(spec: str | os.PathLike, dataset_dir: str | os.PathLike | None = None, *,
                    max_samples: int | None = None, seed: int = 0) -> list[list[dict]]:
    """Conversations of ``spec``: comma-separated registered names, file paths or hub ids, in
    order; ``max_samples`` keeps each one's first rows, ``seed`` draws ``num_samples``."""
    parts = [part.strip() for part in str(spec).split(",") if part.strip()]
    if not parts:
        raise InputError("no dataset given; name a .json/.jsonl file, a dataset_info.json entry or a hub dataset")
    if dataset_dir is not None and str(dataset_dir).startswith("REMOTE:"):
        raise InputError(f"dataset_dir {dataset_dir!r}: fourbit reads dataset_info.json from a local folder; download "
                         f"the hub repository ({str(dataset_dir).removeprefix('REMOTE:')}) and point dataset_dir at it")
    registry = _read_registry(dataset_dir) if dataset_dir is not None else None
    conversations = []
    for position, part in enumerate(parts):
        source = _source(part, registry, dataset_dir)
        rows = _sample(source.rows(), source.num_samples, np.random.default_rng([seed, position]))
        rows = rows[:max_samples] if max_samples is not None else rows
        fmt = source.fmt or DatasetFormat.of(detect_format(rows, str(source)))
        for index, row in enumerate(rows):
            try:
                conversations.append(to_messages(row, fmt, index))
            except ValueError as e:
                raise InputError(f"dataset {part!r} ({source}) {e}") from e
    return conversations


def _source(part: str, registry: dict | None, dataset_dir) -> DatasetSource:
    if registry is not None and part in registry:
        return _registry_entry(part, registry[part], Path(dataset_dir))
    if Path(part).is_file():
        return DatasetSource(part, file=Path(part))
    if dataset_dir is not None and (Path(dataset_dir) / part).is_file():
        return DatasetSource(part, file=Path(dataset_dir) / part)
    if _HUB_ID.fullmatch(part) and Path(part).suffix not in (".json", ".jsonl"):
        return DatasetSource(part, hub=part)
    where = (f"registered in {Path(dataset_dir) / 'dataset_info.json'}: {', '.join(sorted(registry)) or 'none'}"
             if registry is not None else "no dataset_dir was given to look names up in")
    raise InputError(f"dataset {part!r} is neither a file, a registered name ({where}) nor a hub id 'org/name'")


def _sample(rows: list[dict], count: int | None, rng: np.random.Generator) -> list[dict]:
    """``count`` rows drawn as LLaMA-Factory draws num_samples: a random order of all rows, cut
    to ``count``; past the dataset's size, further rows drawn at random with repeats."""
    if count is None:
        return rows
    picked = rng.permutation(len(rows))[:count]
    if count > len(rows):
        picked = np.concatenate([picked, rng.choice(len(rows), count - len(rows))])
    return [rows[i] for i in picked]


def _read_registry(dataset_dir: str | os.PathLike) -> dict:
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.is_file():
        return {}
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path} line {e.lineno}: bad JSON ({e.msg})") from e
    if not isinstance(registry, dict):
        raise InputError(f"{path}: expected an object mapping dataset names to entries")
    return registry


def _registry_entry(name: str, entry, dataset_dir: Path) -> DatasetSource:
    where = f"dataset {name!r} in {dataset_dir / 'dataset_info.json'}"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected an object with file_name or hf_hub_url, formatting, columns, tags")
    for key, value in entry.items():
        if key == "ranking" and not value:
            continue
        if key == "ms_hub_url" and "hf_hub_url" in entry:
            continue  # LLaMA-Factory too reads hf_hub_url unless told to use ModelScope
        if key not in _ENTRY_KEYS:
            raise InputError(f"{where}: key {key!r} is not supported; fourbit reads local files and Hugging Face hub "
                             f"datasets with {', '.join(_ENTRY_KEYS)}")
    try:
        fmt = DatasetFormat.of(entry.get("formatting", "alpaca"), entry.get("columns"), entry.get("tags"))
    except ValueError as e:
        raise InputError(f"{where}: {e}") from e
    num_samples = entry.get("num_samples")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1):
        raise InputError(f"{where}: num_samples {num_samples!r} is not allowed; expected an integer >= 1")
    split = entry.get("split", "train")
    for key in ("subset", "split", "folder"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise InputError(f"{where}: {key} {entry[key]!r} is not allowed; expected a string")
    if isinstance(entry.get("hf_hub_url"), str):
        return DatasetSource(name, hub=entry["hf_hub_url"], subset=entry.get("subset"), split=split,
                             folder=entry.get("folder"), fmt=fmt, num_samples=num_samples)
    if "hf_hub_url" in entry:
        raise InputError(f"{where}: hf_hub_url {entry['hf_hub_url']!r} is not allowed; expected a dataset id 'org/name'")
    if not isinstance(entry.get("file_name"), str):
        raise InputError(f"{where}: needs 'file_name', a .json/.jsonl file in {dataset_dir}, or 'hf_hub_url'")
    unused = [key for key in ("subset", "folder") if key in entry] + (["split"] if split != "train" else [])
    if unused:
        raise InputError(f"{where}: {', '.join(unused)} apply to hub datasets (hf_hub_url); a local file is one "
                         "train split")
    return DatasetSource(name, file=dataset_dir / entry["file_name"], fmt=fmt, num_samples=num_samples)
