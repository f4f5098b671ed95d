"""The web UI in a real browser (the system's headless Chromium, through Selenium): a run started
from the Train tab, watched, killed, seen again after a reload, resumed and finished; its adapter
chatted with (streamed, switched mid-conversation), evaluated and merged; a stopped run; the same
refusals as the command line; the login."""

import json
import os
import re
import signal
import subprocess
import time

import httpx
import pytest
from safetensors.torch import load_file

from fourbit.cli import main
from fourbit.webui import runs

pytestmark = pytest.mark.slow


def start_form(page, model, data, name, max_steps, save_steps):
    page.fill("run-name", name)
    page.fill("cfg-model_name_or_path", model)
    page.fill("cfg-dataset", data)
    page.fill("cfg-max_steps", max_steps)
    page.fill("cfg-save_steps", save_steps)
    page.fill("cfg-learning_rate", "5e-3")
    page.fill("cfg-cutoff_len", 64)
    page.fill("cfg-lora_rank", 8)


def training_process(workdir, name) -> int:
    """The ``fourbit train`` process under the run's job shell."""
    job = json.loads((workdir / "jobs" / name / "job.json").read_text())
    return int(subprocess.run(["pgrep", "-P", str(job["pid"])], capture_output=True, text=True).stdout.split()[0])


def step_of(status: str) -> int:
    found = re.search(r"step (\d+)", status)
    return int(found.group(1)) if found else 0


def steps_recorded(folder) -> list[int]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


def run_until(pid: int, condition, seconds: float = 120.0) -> None:
    """Let the held (SIGSTOPped) training process go on until ``condition()``, then hold it again.

    A step of the tiny model takes tens of milliseconds, far less than the page's one-second timer:
    left to itself the run can pass from step 2 to its end between two looks at the page (it did,
    in CI). Held, it shows each state for as long as the test looks, however fast steps become."""
    os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + seconds
    try:
        while not condition():
            assert time.monotonic() < deadline, f"timed out running the training until {condition}"
            time.sleep(0.005)
    finally:
        os.kill(pid, signal.SIGSTOP)


def settled(read, quiet: float = 2.0, seconds: float = 60.0):
    """``read()`` once it has not changed for ``quiet`` seconds (the page's updates have landed)."""
    value, since, deadline = read(), time.monotonic(), time.monotonic() + seconds
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the page kept changing"
        time.sleep(0.1)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
    return value


def test_a_run_from_the_train_tab_survives_a_crash_and_a_reload_then_chats_evaluates_and_exports(
        served, browser, model, data, tmp_path):
    url, workdir, app = served()
    page = browser
    page.open(url)
    start_form(page, model, data, "sums", max_steps=10, save_steps=3)
    page.fill("cfg-val_size", 4)  # an eval loss on 4 held-out rows at each save
    page.click("check")
    page.wait_text("train-message", lambda t: t.startswith(("checked", "error")))
    assert page.text("train-message") == "checked: the run can start."
    preview = page.text("preview")
    assert "trained" in preview and "masked" in preview and "What is 0 plus 0?" in preview
    assert "total" in page.text("memory") and "max_steps: 10" in page.text("yaml")

    page.click("start")
    page.wait_text("train-message", lambda t: t.startswith(("started", "error")))
    out = runs.run_folder(workdir, "sums")
    pid = page.wait(lambda: training_process(workdir, "sums"), 60, "the training process")
    os.kill(pid, signal.SIGSTOP)  # held between the states the page is looked at (run_until)

    def curve():
        return page.find("#curve img").get_attribute("src")

    try:
        # the curve updates while the run goes on: two different pictures at two different steps
        run_until(pid, lambda: len(runs.view(workdir, "sums").steps) >= 2)
        step = runs.view(workdir, "sums").step
        page.wait_text("run-status", lambda t: "running" in t and step_of(t) == step)
        first = page.wait(lambda: settled(curve), 60, "the curve")
        run_until(pid, lambda: runs.view(workdir, "sums").step > step)
        step = runs.view(workdir, "sums").step
        assert step < 10, "the run went to its end while the test ran it a step further"
        page.wait_text("run-status", lambda t: "running" in t and step_of(t) == step)
        page.wait(lambda: curve() != first, 60, "the curve drawn again")

        # killed (as out of memory would) once the second checkpoint is written
        run_until(pid, lambda: (out / "checkpoint-6" / "trainer_state.json").is_file())
        assert runs.view(workdir, "sums").step < 10, "the run went to its end before it could be killed"
    finally:
        os.kill(pid, signal.SIGKILL)  # never left held, whatever failed above
    page.wait_text("run-status", lambda t: "crashed (killed by signal 9)" in t)
    page.driver.refresh()  # the page comes back showing the run as it is on disk
    page.wait(lambda: page.find("#tabs"))
    page.wait_text("run-status", lambda t: "sums: crashed" in t)
    assert page.find("#runs input").get_attribute("value") == "sums"

    page.click("resume")
    page.wait_text("train-message", lambda t: t.startswith(("resumed", "error")))
    assert "resume_from_checkpoint=latest" in page.text("train-message")
    page.wait_text("run-status", lambda t: "finished" in t, 120)
    assert "step 10 of 10" in page.text("run-status") and "eval loss" in page.text("run-status")
    assert steps_recorded(out) == list(range(1, 11))  # the steps after checkpoint-6 trained and recorded once
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()
    page.screenshot("train")

    page.tab("Chat")
    page.fill("chat-model", model)
    page.click("chat-load")
    page.wait_text("chat-status", lambda t: t.startswith(("loaded", "**error")))
    page.fill("chat-max-new", 60)
    page.fill("chat-input", "Write two sentences about the sea.")
    # every text the answer's row shows, recorded by the page itself as the DOM changes (polling
    # from here could miss a fast stream's intermediate states)
    page.driver.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
            const rows = document.querySelectorAll('#chatbot .bot-row');
            const text = rows.length ? rows[rows.length - 1].innerText : '';
            if (text && window.seen[window.seen.length - 1] !== text) window.seen.push(text);
        }).observe(document.querySelector('#chatbot'), {childList: true, subtree: true, characterData: true});""")
    page.click("chat-send")

    def answered():  # the text has stopped changing for a second
        texts = page.driver.execute_script("return window.seen")
        if texts != answered.last:
            answered.last, answered.since = texts, time.monotonic()
        return texts and time.monotonic() - answered.since > 1.0
    answered.last, answered.since = None, time.monotonic()
    page.wait(answered, 60, "the first answer")
    seen = page.driver.execute_script("return window.seen")
    assert len({s for s in seen if s}) >= 3, seen  # streamed: the text grew in several steps
    page.choose("chat-adapter", "sums")  # mid-conversation: the run's adapter answers next
    page.fill("chat-input", "What is 1 plus 2?")
    page.click("chat-send")
    page.wait(lambda: len(page.all("#chatbot .user-row")) == 2 and len(page.all("#chatbot .bot-row")) == 2
              and page.all("#chatbot .bot-row")[-1].text.strip(), 60, "the second answer")
    assert app.chat.engine.adapters.names == ["sums"]  # loaded into the serving engine when chosen
    page.screenshot("chat")

    text = tmp_path / "text.txt"
    text.write_text("What is 1 plus 2? 3. What is 2 plus 2? 4. " * 40)
    page.tab("Evaluate")
    page.fill("eval-model", model)
    page.choose("eval-adapter", "sums")
    page.fill("eval-text", text)
    page.fill("eval-context", 64)
    page.click("eval-perplexity")
    page.wait_text("eval-status", lambda t: "perplexity: finished" in t or "failed" in t, 120)
    assert "perplexity" in page.text("eval-log") and "failed" not in page.text("eval-status")
    page.screenshot("evaluate")

    page.tab("Export")
    page.fill("export-model", model)
    page.choose("export-adapter", "sums")
    page.fill("export-name", "sums-merged")
    page.click("export-merge")
    page.wait_text("export-status", lambda t: "merge: finished" in t or "failed" in t, 120)
    merged = workdir / "exports" / "sums-merged"
    assert f"output: {merged}" in " ".join(page.text("export-status").split())  # the browser wraps long lines
    assert "model.embed_tokens.weight" in load_file(merged / "model.safetensors")
    page.screenshot("export")


def test_a_stopped_run_keeps_its_checkpoints_and_the_ui_goes_on(served, browser, model, data):
    url, workdir, _ = served()
    page = browser
    page.open(url)
    # never at its end before the stop (10,000 steps of the tiny model: ~8 minutes alone)
    start_form(page, model, data, "stopped", max_steps=10_000, save_steps=3)
    page.click("start")
    out = runs.run_folder(workdir, "stopped")
    # the model's loading and three steps take ~7 s alone; 120 s for a busy machine
    page.wait(lambda: (out / "checkpoint-3" / "trainer_state.json").is_file(), 120, "checkpoint-3")
    page.click("stop")
    page.wait_text("run-status", lambda t: "stopped: stopped" in t)
    for checkpoint in out.glob("checkpoint-*"):  # each whole: written atomically, never half
        assert {p.name for p in checkpoint.iterdir()} >= {
            "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt",
            "trainer_state.json"}
        assert load_file(checkpoint / "adapter_model.safetensors")
    assert not list(out.glob(".checkpoint-*"))  # the stop left nothing half-written behind
    page.click("check")  # the UI still answers
    page.wait_text("train-message", lambda t: t.startswith(("checked", "**error", "error")))


def test_compare_shows_its_table_and_its_plot(served, browser, model, tmp_path):
    url, _, _ = served()
    page = browser
    page.open(url)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    page.tab("Evaluate")
    page.fill("eval-model", model)
    page.fill("eval-text", text)
    page.fill("eval-context", 64)
    page.tab("compare quantization methods")
    for label in page.all("#eval-methods label"):  # bf16 and nf4 stay ticked
        if label.text.strip() in ("nf4-dq", "fp4", "int4-rtn"):
            label.click()
    page.fill("eval-group-size", 32)
    page.click("eval-compare")
    page.wait_text("eval-status", lambda t: "compare: finished" in t or "failed" in t, 120)
    log = page.text("eval-log")
    assert "method" in log and "\nbf16 " in log and "\nnf4 " in log  # compare's table, a row per method
    assert page.wait(lambda: page.find("#eval-plot img"), 10, "the plot").get_attribute("src")
    page.screenshot("compare")


def test_the_browser_shows_the_command_lines_refusal(served, browser, model, data, capsys):
    url, workdir, _ = served()
    page = browser
    page.open(url)
    start_form(page, model, data, "bad", max_steps=4, save_steps=4)
    page.fill("cfg-lora_dropout", 1.5)
    page.click("check")
    shown = page.wait_text("train-message", lambda t: t.startswith("error"))
    out = runs.run_folder(workdir, "bad").resolve()
    assert main(["train", f"model_name_or_path={model}", f"dataset={data}", f"output_dir={out}",
                 "lora_dropout=1.5"]) == 2
    assert shown == "error: " + capsys.readouterr().err.strip().removeprefix("fourbit train: error: ")


def test_with_auth_nothing_is_served_before_the_login(served):
    url, _, app = served(auth="ada:s3cret")
    assert app.server_name == "127.0.0.1"  # the default: this machine only
    with httpx.Client(base_url=url) as client:
        assert client.get("config").status_code in (401, 403)
        assert client.post("login", data={"username": "ada", "password": "wrong"}).status_code >= 400
        assert client.post("login", data={"username": "ada", "password": "s3cret"}).status_code == 200
        assert client.get("config").status_code == 200
