"""Atomic writes: a folder or file appears complete under its final name, or not at all.

Everything is written into a temporary sibling (same filesystem, so the final rename is
atomic) that is removed if anything fails. Replacing an existing folder moves the old one
aside first and deletes it only once the new one is in place; a crash in between leaves the
old folder under a ``.old-*`` name, never a half-written one under the real name. The
temporary names carry the writer's process id, so the next write to the same place clears what
a killed writer (``kill -9`` runs no cleanup) left: its temporary folder is removed, and a folder
it had moved aside is put back when nothing has taken its name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp:`` write into ``tmp``; on success it becomes ``out``."""
    path = Path(path)
    if path.parent.is_dir():
        _clear_dead_writers(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another output folder or pass overwrite")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _clear_dead_writers(path: Path) -> None:
    """Remove the temporary folders of writers to ``path`` that died, putting back a folder one
    of them had moved aside (when ``path`` is missing: the kill came between the two renames)."""
    for leftover in sorted(path.parent.glob(f".{path.name}.*-*-*")):
        kind, _, rest = leftover.name.removeprefix(f".{path.name}.").partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        aside = leftover / path.name
        if kind == "old" and aside.exists() and not path.exists():
            os.replace(aside, path)
        shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """``with atomic_file(p) as f:`` write to ``f``; on success it replaces ``p`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_apart(output: str | os.PathLike, *sources: str | os.PathLike | None) -> None:
    """Refuse an output folder that is, or holds, one of the ``sources`` being read: writing it
    (with overwrite) would replace the very model or adapter the command reads. Sources that are
    not local paths (hub ids, None for the embedded model) cannot be hit and pass."""
    out = Path(output).expanduser().resolve()
    for source in sources:
        if source is None or not Path(source).expanduser().exists():
            continue
        src = Path(source).expanduser().resolve()
        if out == src or out in src.parents:
            relation = "is" if out == src else "holds"
            raise InputError(f"the output {output} {relation} the input {source}: writing it would replace what is being "
                             "read; choose an output folder outside it")
