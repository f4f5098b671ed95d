"""English text that every Python ships: the documentation topics of ``pydoc_data`` (the pages of
the language reference and library that ``help()`` shows), about 465,000 characters, no download.

fourbit reads it where it needs general prose rather than one task's conversations:

    GPTQ and AWQ calibration (ptq/calibration.py)   the topics from the last key backwards
    fourbit compare's perplexity text (compare.py)    the topics from the first key forwards

so calibration and evaluation do not share text unless together they take more tokens than the
topics hold (about 110,000 with SmolLM2's tokenizer; the defaults take 16,384 and 8,192). The
text differs between Python versions: say which one with the figures (:func:`describe`).
"""

from __future__ import annotations

import platform

from .errors import InputError


def documentation_topics(reverse: bool = False) -> list[str]:
    """The topics' texts in the order of their keys (or the reverse)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip it from the standard library
        raise InputError("this Python has no pydoc_data (its documentation topics, fourbit's default text for "
                         "calibration and compare); pass a text file instead") from e
    return [topics[key] for key in sorted(topics, reverse=reverse)]


def describe(order: str) -> str:
    return f"Python {platform.python_version()}'s documentation topics (pydoc_data, {order})"
