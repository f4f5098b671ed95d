"""Rows of a dataset on the Hugging Face hub, read through the ``datasets`` library.

io/datasets.py comes here for a registry entry with ``hf_hub_url`` (LLaMA-Factory's key, with its
optional ``subset``, ``split`` and ``folder``) and for a ``dataset: org/name`` that is neither a
file nor a registered name. ``datasets.load_dataset(id, name=subset, split=split,
data_dir=folder)`` downloads and caches the data (``HF_DATASETS_OFFLINE=1`` reads the cache
alone), and reads a local dataset folder (a ``.jsonl``/``.json``/``.parquet``/``.csv`` file per
split) the same way. The rows it returns are checked by the caller exactly as a local file's are.
Recent ``datasets`` releases run no loading scripts, so a dataset's own code never runs.

``datasets`` is an optional dependency (``pip install "fourbit[hub]"``): naming a hub dataset
without it is an error that says how to install it.
"""

from __future__ import annotations

from ..errors import InputError


def load_hub_rows(path: str, subset: str | None = None, split: str = "train", folder: str | None = None) -> list[dict]:
    """The rows of split ``split`` of hub dataset ``path`` (or a local dataset folder), as dicts."""
    where = f"hub dataset {path!r}" + (f" (subset {subset!r})" if subset else "")
    try:
        import datasets
    except ImportError:
        raise InputError(f"{where}: reading datasets from the Hugging Face hub needs the `datasets` library: "
                         "pip install \"fourbit[hub]\" (or download the data and name the file)") from None
    try:
        data = datasets.load_dataset(path, name=subset, split=split, data_dir=folder)
    except (FileNotFoundError, ConnectionError, ValueError,  # no such dataset, offline, a bad subset or split
            datasets.exceptions.DatasetGenerationError) as e:  # files it cannot read as one table
        problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{where}: cannot be loaded ({problem})") from e
    if not isinstance(data, datasets.Dataset):
        raise InputError(f"{where}: split {split!r} did not load as one table ({type(data).__name__})")
    rows = data.to_list()
    if not rows:
        raise InputError(f"{where}: split {split!r} has no rows")
    return rows
