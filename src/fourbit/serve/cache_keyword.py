"""A causal LM's KV cache across transformers' rename of ``past_key_values`` to ``cache``.

transformers 5.24 takes the cache as ``model(..., cache=...)`` and returns it as ``out.cache``;
the old names still work there, with a FutureWarning that every ``fourbit chat`` user saw, and
go in 5.40. Releases up to 5.22 (fourbit supports 5.17 on: pyproject.toml) know only
``past_key_values``. fourbit's serving code asks the model's forward which name it takes.
"""

from __future__ import annotations

import functools
import inspect


def cache_keyword(model) -> str:
    """The name ``model``'s forward takes its cache by: ``cache``, or ``past_key_values`` before the rename."""
    return _keyword(type(model))


@functools.cache
def _keyword(model_class) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def returned_cache(out):
    """The cache a forward returned: ``out.cache``, or ``out.past_key_values`` before the rename."""
    return out["cache"] if "cache" in out else out.past_key_values
