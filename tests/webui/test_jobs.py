"""Jobs: processes of their own whose state is read back from their folder, whoever started them."""

import os
import signal
import sys
import time

import pytest

from fourbit.webui import jobs


def wait_for(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_finished_job_and_a_failed_one_are_told_apart_by_their_exit_status(tmp_path):
    ok = jobs.start(tmp_path / "ok", "test", python("print('hello')"))
    bad = jobs.start(tmp_path / "bad", "test", python("import sys; print('fourbit x: error: no'); sys.exit(2)"))
    wait_for(lambda: not ok.running() and not bad.running())
    assert ok.state() == "finished" and ok.log_tail() == "hello" and ok.error_line() is None
    assert bad.state() == "failed (exit 2)" and bad.error_line() == "fourbit x: error: no"


def test_a_stopped_job_is_stopped_and_a_killed_one_crashed(tmp_path):
    stopped = jobs.start(tmp_path / "stopped", "test", python("import time; time.sleep(60)"))
    killed = jobs.start(tmp_path / "killed", "test", python("import time; print('up', flush=True); time.sleep(60)"))
    wait_for(lambda: killed.log_tail() == "up")
    stopped.stop()
    assert stopped.state() == "stopped"
    child = int(os.popen(f"pgrep -P {killed.pid}").read().split()[0])  # the command under the job's shell
    os.kill(child, signal.SIGKILL)  # as the kernel's OOM killer would
    wait_for(lambda: not killed.running())
    assert killed.state() == "crashed (killed by signal 9)"


def test_a_job_started_by_an_earlier_ui_process_is_still_seen_and_stoppable(tmp_path, monkeypatch):
    job = jobs.start(tmp_path / "long", "test", python("import time; time.sleep(60)"))
    monkeypatch.setattr(jobs, "_children", {})  # a new UI process knows the job only by its folder
    again = jobs.Job.load(tmp_path / "long")
    assert again.running() and again.state() == "running" and again.pid == job.pid
    again.stop()
    assert not again.running() and again.state() == "stopped"
    os.waitpid(job.pid, 0)  # this test's own child, reaped (the real earlier process would be init's)


def test_the_log_tail_shows_each_progress_bar_at_its_latest_state(tmp_path):
    job = jobs.start(tmp_path / "bar", "test", python(
        "import sys; sys.stdout.write('start\\n10%\\r50%\\r\\x1b[A100%\\nend\\n')"))
    wait_for(lambda: not job.running())
    assert job.log_tail() == "start\n100%\nend"


def test_a_running_job_is_not_started_twice_and_names_are_checked(tmp_path):
    job = jobs.start(tmp_path / "once", "test", python("import time; time.sleep(60)"))
    with pytest.raises(RuntimeError, match="still running"):
        jobs.start(tmp_path / "once", "test", python("pass"))
    job.stop()
    assert jobs.check_name(" run-2 ") == "run-2"
    for bad in ("", "../up", "a/b", ".hidden", "x" * 65):
        with pytest.raises(ValueError, match="use letters, digits"):
            jobs.check_name(bad)


def test_the_command_is_shown_as_a_user_would_type_it(tmp_path):
    job = jobs.start(tmp_path / "cmd", "test", jobs.fourbit_command("eval", "--perplexity", "a file.txt"))
    job.stop()  # only its command line is looked at
    assert job.command == "fourbit eval --perplexity 'a file.txt'"
    assert jobs.jobs(tmp_path)[0].name == "cmd"
