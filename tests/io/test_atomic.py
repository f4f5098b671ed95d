"""Atomic folders: complete under their name or absent, and what a killed writer left is cleared."""

import os
import subprocess
import sys

import pytest

from fourbit.io.atomic import atomic_dir


def dead_pid() -> int:
    """The process id of a process that has exited."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_write(tmp_path):
    half = tmp_path / f".out.tmp-{dead_pid()}-abc"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half written")
    live = tmp_path / f".out.tmp-{os.getpid()}-def"  # a writer still at work: left alone
    live.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]


def test_a_folder_a_killed_writer_had_moved_aside_is_put_back(tmp_path):
    # killed between moving the old `out` aside and renaming the new one into place
    aside = tmp_path / f".out.old-{dead_pid()}-xyz"
    (aside / "out").mkdir(parents=True)
    (aside / "out" / "config.json").write_text("the old, complete folder")
    with pytest.raises(FileExistsError, match="already exists"):  # it is back, and protected as before
        with atomic_dir(tmp_path / "out"):
            pass
    assert (tmp_path / "out" / "config.json").read_text() == "the old, complete folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
