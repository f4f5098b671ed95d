"""The web UI's long work, each a ``fourbit`` command in a process of its own.

    jobs/NAME/
        job.json      what ran: kind, the command line, the process id, when, its output
        log.txt       the command's stdout and stderr (tqdm's bars included)
        exit_code     written by the shell that started it, once the command has ended

A job is started in a new session (process group) through ``sh -c 'CMD; echo $? > exit_code'``:
a crash of the command is recorded with its exit status, the UI process can die or restart
without taking the job along, and stopping a job is one signal to its whole group (the shell
with it, so nothing records an exit status for a job that was stopped: a ``stopped`` marker does).
Everything the UI shows about a job is read back from this folder, so a browser reload or a new
UI process shows the same state.

States: running, finished (exit 0), failed (exit 2: the command refused its input, log.txt's
last line says why; other codes: an error with its traceback in the log), crashed (killed by a
signal the UI did not send, e.g. out of memory), stopped (by the UI), or gone (no process and no
exit status: the machine restarted under it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..io.atomic import atomic_file

JOB_FILE, LOG_FILE, EXIT_FILE, STOPPED_FILE = "job.json", "log.txt", "exit_code", "stopped"
_children: dict[int, subprocess.Popen] = {}  # this process's own jobs: polled so none is left a zombie


def fourbit_command(*args: str) -> list[str]:
    """``fourbit ARGS`` as this Python runs it (the venv the UI runs in, whatever is on PATH)."""
    return [sys.executable, "-m", "fourbit", *args]


@dataclass
class Status:
    """What a job's folder says: its state, the log's last lines, a failed command's last line."""

    state: str
    log: str
    error: str | None


@dataclass
class Job:
    folder: Path
    kind: str
    argv: list[str]
    pid: int
    started: float
    output: str | None = None  # the file or folder the job writes, shown when it has finished

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def command(self) -> str:
        """The command line to run it by hand (``fourbit ...`` for fourbit's own commands)."""
        prefix = fourbit_command()
        args = ["fourbit", *self.argv[len(prefix):]] if self.argv[:len(prefix)] == prefix else self.argv
        return shlex.join(args)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Job:
        record = json.loads((Path(folder) / JOB_FILE).read_text())
        return cls(Path(folder), record["kind"], record["argv"], record["pid"], record["started"], record.get("output"))

    def exit_code(self) -> int | None:
        try:
            return int((self.folder / EXIT_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def running(self) -> bool:
        child = _children.get(self.pid)
        if child is not None:
            return child.poll() is None
        try:  # a job of an earlier UI process: alive, and still this job's shell (not a reused pid)
            return str(self.folder) in Path(f"/proc/{self.pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False

    def state(self) -> str:
        if self.running():
            return "running"
        code = self.exit_code()
        if code == 0:
            return "finished"
        if code is not None:
            return f"crashed (killed by signal {code - 128})" if code > 128 else f"failed (exit {code})"
        return "stopped" if (self.folder / STOPPED_FILE).exists() else "gone (no process, no exit status)"

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the job's process group, SIGKILL after ``grace`` seconds. Checkpoints are
        written atomically (io/atomic.py), so a stop at any moment leaves the last one intact."""
        if not self.running():
            return
        (self.folder / STOPPED_FILE).touch()
        _signal_group(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.running():
            _signal_group(self.pid, signal.SIGKILL)
            while self.running():
                time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        """The log's last lines, each progress bar at its latest state (tqdm redraws with '\\r')."""
        try:
            text = (self.folder / LOG_FILE).read_bytes().decode(errors="replace")  # keeps '\r' (read_text would not)
        except FileNotFoundError:
            return ""
        shown = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
        shown = [_ANSI.sub("", line) for line in shown]
        while shown and not shown[-1].strip():
            shown.pop()
        return "\n".join(shown[-lines:])

    def status(self, lines: int = 30) -> Status:
        """The state, the log's last ``lines`` and, for a failed or crashed command, the last line
        it printed ('fourbit train: error: ...', or a traceback's last line): each read once."""
        state, log = self.state(), self.log_tail(lines)
        printed = [line for line in log.splitlines() if line.strip()]
        failed = state.startswith(("failed", "crashed")) and printed
        return Status(state, log, printed[-1] if failed else None)

    def error_line(self) -> str | None:
        return self.status().error


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str, what: str = "run name") -> str:
    """A name that is one safe path component (runs, exports)."""
    name = (name or "").strip()
    if not _NAME.match(name):
        raise ValueError(f"{what} {name!r}: use letters, digits, '.', '_' and '-' (up to 64, starting with a letter "
                         "or digit)")
    return name


def start(folder: str | os.PathLike, kind: str, argv: list[str], output: str | None = None,
          append_log: bool = False) -> Job:
    """Run ``argv`` as job ``folder`` (created; a finished job's folder is reused, its log kept
    when ``append_log``). Refuses a folder whose job is still running."""
    folder = Path(folder).resolve()
    if (folder / JOB_FILE).exists() and Job.load(folder).running():
        raise RuntimeError(f"job {folder.name} is still running; stop it first")
    folder.mkdir(parents=True, exist_ok=True)
    for marker in (EXIT_FILE, STOPPED_FILE):
        (folder / marker).unlink(missing_ok=True)
    exit_file = shlex.quote(str(folder / EXIT_FILE))
    # the shell records the exit status atomically (a reader never sees a half-written number)
    script = f'"$@"; echo $? > {exit_file}.tmp && mv {exit_file}.tmp {exit_file}'
    log = open(folder / LOG_FILE, "ab" if append_log else "wb")
    try:
        child = subprocess.Popen(
            ["sh", "-c", script, str(folder), *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},  # the log fills as it prints
        )
    finally:
        log.close()
    _children[child.pid] = child
    job = Job(folder, kind, list(argv), child.pid, time.time(), output)
    with atomic_file(folder / JOB_FILE) as f:
        f.write(json.dumps({"kind": kind, "argv": job.argv, "pid": job.pid, "started": job.started, "output": output},
                           indent=2))
    return job


def jobs(root: str | os.PathLike, kind: str | None = None) -> list[Job]:
    """The jobs under ``root``, newest first (of one ``kind`` if given)."""
    found = []
    for record in Path(root).glob(f"*/{JOB_FILE}"):
        try:
            job = Job.load(record.parent)
        except (OSError, ValueError, KeyError):
            continue  # a folder being written, or not a job
        if kind is None or job.kind == kind:
            found.append(job)
    return sorted(found, key=lambda j: j.started, reverse=True)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session: the shell leads the group, the command is in it
    except ProcessLookupError:
        pass
