"""transformers' ``from_pretrained`` and ``from_config`` without remote code.

A model folder may carry Python files and name them in its config (``auto_map``); transformers
runs them when asked with ``trust_remote_code=True``, and when not told either way it asks on
the terminal. fourbit has no use for such code and never runs it: every call into transformers'
loaders goes through here with ``trust_remote_code=False``. A folder whose architecture
transformers implements loads with transformers' own classes (its ``auto_map`` is ignored); one
that needs its own code is refused, saying so.
"""

from __future__ import annotations

from ..errors import InputError


def from_pretrained(cls, *args, what: str, **kwargs):
    """``cls.from_pretrained(*args, **kwargs)`` with ``trust_remote_code=False``; ``what`` names
    the thing being loaded in the error."""
    return _refusing_remote_code(lambda: cls.from_pretrained(*args, trust_remote_code=False, **kwargs), what)


def from_config(cls, config, what: str, **kwargs):
    """``cls.from_config(config, **kwargs)`` with ``trust_remote_code=False``."""
    return _refusing_remote_code(lambda: cls.from_config(config, trust_remote_code=False, **kwargs), what)


def _refusing_remote_code(load, what: str):
    try:
        return load()
    except ValueError as error:
        if "trust_remote_code" not in str(error) and "custom code" not in str(error):
            raise
        raise InputError(
            f"{what} needs Python code that comes with it (its config's auto_map), and fourbit never runs a "
            "model's own code (trust_remote_code=False); use a model whose architecture transformers implements"
        ) from None
