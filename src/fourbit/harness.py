"""lm-evaluation-harness on fourbit's model: the benchmarks people quote (MMLU, HellaSwag, ARC,
TruthfulQA, ...) scored in-process on the quantized base plus adapter.

The harness's ``hf`` model class (``HFLM``) accepts a loaded transformers model, and fourbit's
model is one, with 4-bit layers inside. So the harness builds the requests, batches them, runs
the forward passes through its own code and computes its own metrics: the numbers are what
``lm_eval --model hf`` would report for these weights, comparable with anyone's. Task names are
resolved as the harness's command line resolves them (its ``EvaluatorConfig``): registered names
and groups, and paths to YAML files for tasks of one's own (with local data files, for example).

lm-evaluation-harness is an optional extra: ``pip install 'fourbit[eval]'``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .io.atomic import atomic_file

INSTALL_HINT = "pip install 'fourbit[eval]'  (lm-evaluation-harness with its hf extra)"


def require_harness() -> None:
    """An InputError that says how to install the harness, where it is missing."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ModuleNotFoundError as e:
        raise InputError(f"--tasks runs lm-evaluation-harness, which is not installed ({e}); run: {INSTALL_HINT}") from None


@dataclass
class TaskSelection:
    """Tasks resolved as ``lm_eval --tasks`` resolves them: names, and configs read from YAML files."""
    tasks: list
    manager: object  # lm_eval.tasks.TaskManager


def select_tasks(tasks: str | list[str]) -> TaskSelection:
    """Comma-separated task names, groups or YAML paths -> a TaskSelection; a ValueError naming any
    that is neither a registered task nor a file (before a model is loaded)."""
    require_harness()
    from lm_eval.config import EvaluatorConfig

    config = EvaluatorConfig(tasks=tasks if isinstance(tasks, str) else ",".join(tasks))
    try:
        manager = config.process_tasks()
    except ValueError as e:  # the harness names the tasks it did not find
        raise InputError(f"--tasks: {e} (a registered task or group name, or a path to a task's YAML file)") from None
    return TaskSelection(config.tasks, manager)


def evaluate_tasks(model, tokenizer, tasks: str | list[str] | TaskSelection, num_fewshot: int | None = None,
                   limit: float | None = None, batch_size: int = 1, apply_chat_template: bool = False,
                   log_samples: bool = False) -> dict:
    """Run lm-evaluation-harness ``tasks`` on ``model`` (fourbit's, or any transformers model).

    Returns the harness's own results dict (``results``, ``n-shot``, ``versions``, ``config``, ...;
    ``samples`` with ``log_samples``). ``limit``: documents per task (a fraction below 1).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    check_settings(num_fewshot, limit, batch_size)
    selection = tasks if isinstance(tasks, TaskSelection) else select_tasks(tasks)
    with _quiet("lm_eval.models.huggingface"):  # its warnings that a loaded model was passed: we mean to
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(
        model=lm, tasks=selection.tasks, task_manager=selection.manager, num_fewshot=num_fewshot, limit=limit,
        batch_size=batch_size, log_samples=log_samples, apply_chat_template=apply_chat_template,
    )  # the seeds stay the harness's defaults, as on its command line: same few-shot examples, same numbers
    if results is None:  # only rank 0 of a distributed run gets results; this is one process
        raise RuntimeError("lm-evaluation-harness returned no results")
    return results


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_settings(num_fewshot: int | None, limit: float | None, batch_size: int) -> None:
    if num_fewshot is not None and num_fewshot < 0:
        raise InputError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    if limit is not None and not limit > 0:
        raise InputError(f"--limit must be above 0 (documents per task, or a fraction below 1), got {limit}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be 1 or more, got {batch_size}")


def results_table(results: dict) -> str:
    """The harness's own markdown table (task, version, filter, n-shot, metric, value, stderr)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def write_results(results: dict, path: str | os.PathLike) -> list[Path]:
    """The results as JSON at ``path`` (what ``lm_eval --output_path`` writes, without the samples)
    and, where they were logged, each task's samples as ``<stem>_samples_<task>.jsonl`` beside it
    (one JSON object per document, as the harness logs them). Each file appears whole or not at
    all. Returns the paths written."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    samples = results.get("samples") or {}
    summary = {k: v for k, v in results.items() if k != "samples"}
    written = []
    with atomic_file(path) as f:
        json.dump(summary, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
    written.append(path)
    for task, rows in samples.items():
        sample_path = path.with_name(f"{path.stem}_samples_{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}.jsonl")
        with atomic_file(sample_path) as f:
            for row in rows:
                f.write(json.dumps(_as_logged(row), default=handle_non_serializable, ensure_ascii=False) + "\n")
        written.append(sample_path)
    return written


def _as_logged(sample: dict) -> dict:
    """A sample in the shape the harness's own samples files have, so that whatever reads those
    (its ``datasets``-based loaders, people's scripts) reads ours: each request's arguments as
    ``{"gen_args_i": {"arg_j": ...}}``, responses and the target as strings."""
    from lm_eval.utils import sanitize_list

    arguments = {f"gen_args_{i}": {f"arg_{j}": value for j, value in enumerate(request)}
                 for i, request in enumerate(sample["arguments"])}
    return sample | {"arguments": arguments, "resps": sanitize_list(sample["resps"]),
                     "filtered_resps": sanitize_list(sample["filtered_resps"]), "target": str(sample["target"])}
