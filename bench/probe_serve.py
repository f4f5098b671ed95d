"""The hostile-client probe of issue 18, over HTTP, against fourbit serve before and after.

    python bench/probe_serve.py --server fourbit [--server fourbit-static=DIR]

Question: does each class of fault the probe found in the static-batching server (commit
21d634d) hold in this checkout's server? The tests (tests/serve/test_server_bounds.py) check
this checkout in-process; this script asks both servers the same things from outside, so the
"fails before" half is shown too.

Method
- Each server is started as its own process (bench_serve_load.start) on the embedded
  SmolLM2-135M-Instruct, with one adapter (a0), an --adapter-root holding two more (a1, a2) and
  --max-concurrent 64; the same probes run against each, one after another.
- A probe holds when: neighbours of a pathological request get what they get alone (greedy);
  a base request queued beside an adapter being unloaded gets its answer; a list of 300 prompts
  is refused (4xx) rather than taken whole; a short request after a dropped long stream takes
  about its own time; 100 idle connections are closed by the server within 12 s; malformed
  framing is answered 4xx within 10 s; 80 requests released together get answers (200 or
  429), no resets; malformed values get 400; a chunked body is read; broken adapter configs and
  symlinks leading outside the root are refused (4xx).
- Table last (probe, one column per server: held / FAILED with what happened); JSON to $OUT
  or bench/results/serve-probe.json.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

from bench_serve_load import adapter_folders, free_port, model_folder, results_dir, start, stop
from soak_serve import cancel_stream, proc_status

MESSAGES = [{"role": "user", "content": "Name three colours."}]


class Server:
    def __init__(self, port: int, pid: int, model: str):
        self.port, self.pid, self.model = port, pid, model

    def post(self, path: str, body: dict | bytes, timeout: float = 300) -> tuple[int, dict | str]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        connection.request("POST", path, data, {"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
        connection.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw[:200].decode(errors="replace")

    def chat(self, model: str | None = None, max_tokens: int = 8, **extra) -> tuple[int, str]:
        status, answer = self.post("/v1/chat/completions", {"model": model or self.model, "messages": MESSAGES,
                                                            "max_tokens": max_tokens, "temperature": 0, **extra})
        if status == 200:
            return status, answer["choices"][0]["message"]["content"]
        return status, str(answer)[:120]

    def raw(self, data: bytes, timeout: float = 10) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            return answer

    def threads(self) -> int:
        return proc_status(self.pid)[1]


def together(calls: list) -> list:
    """Run the callables at once (released by one barrier); their results in order."""
    results, barrier = [None] * len(calls), threading.Barrier(len(calls))

    def run(i):
        barrier.wait()
        try:
            results[i] = calls[i]()
        except OSError as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def probe_neighbours(s: Server) -> tuple[bool, str]:
    want = s.chat()
    got = together([lambda: s.chat(temperature=1e-30), lambda: s.chat(), lambda: s.chat(top_k=10**9, temperature=1.0,
                                                                                          seed=3), lambda: s.chat()])
    held = got[1] == want and got[3] == want
    return held, f"neighbours: {got[1][0]}, {got[3][0]}" + ("" if held else f" ({str(got[1][1])[:60]})")


def probe_unload(s: Server) -> tuple[bool, str]:
    want = s.chat(max_tokens=16)
    s.post("/v1/load_lora_adapter", {"lora_name": "spare", "lora_path": "a1"})
    calls = [lambda: s.chat("spare", 64) for _ in range(3)] + [lambda: s.chat(max_tokens=16)]
    unload = threading.Timer(0.3, lambda: s.post("/v1/unload_lora_adapter", {"lora_name": "spare"}))
    unload.start()
    got = together(calls)
    unload.join()
    return got[3] == want, f"base request: {got[3][0]}" + ("" if got[3] == want else f" {str(got[3][1])[:60]}")


def probe_list(s: Server) -> tuple[bool, str]:
    start_time = time.monotonic()
    status, _ = s.post("/v1/completions", {"model": s.model, "prompt": ["Hello there"] * 300, "max_tokens": 4})
    return 400 <= status < 500, f"{status} after {time.monotonic() - start_time:.1f} s"


def probe_gone_client(s: Server) -> tuple[bool, str]:
    alone = _timed(lambda: s.chat(max_tokens=8))
    cancel_stream(s.port, s.model, MESSAGES[0]["content"])  # 200 tokens asked, gone after the first
    after = _timed(lambda: s.chat(max_tokens=8))
    return after < alone + 2.0, f"a short request {after:.2f} s after the client left (alone {alone:.2f} s)"


def probe_idle(s: Server) -> tuple[bool, str]:
    before = s.threads()
    sockets = [socket.create_connection(("127.0.0.1", s.port), timeout=5) for _ in range(100)]
    time.sleep(1)
    held_threads = s.threads()
    time.sleep(11)
    closed = 0
    for sock in sockets:
        sock.settimeout(0.2)
        try:
            closed += sock.recv(1) == b""
        except (TimeoutError, OSError):
            pass
        sock.close()
    return closed == 100, f"{closed}/100 closed by the server after 12 s; threads {before} -> {held_threads}"


def probe_framing(s: Server, request: bytes) -> tuple[bool, str]:
    try:
        answer = s.raw(request, timeout=10)
    except TimeoutError:
        return False, "no answer in 10 s"
    except OSError as e:
        return False, type(e).__name__
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else None
    return status is not None and 400 <= status < 500, f"{status}"


def probe_crowd(s: Server) -> tuple[bool, str]:
    body = json.dumps({"model": s.model, "messages": MESSAGES, "max_tokens": 2}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    def one():
        answer = s.raw(request, timeout=300)
        return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else "empty"

    got = together([one] * 80)
    errors = [g for g in got if not isinstance(g, int)]
    statuses = {g: sum(1 for x in got if x == g) for g in set(got) if isinstance(g, int)}
    return not errors and set(statuses) <= {200, 429}, f"statuses {statuses}, {len(errors)} resets or errors"


def probe_value(s: Server, body: bytes) -> tuple[bool, str]:
    status, answer = s.post("/v1/chat/completions", body)
    return status == 400, f"{status}"


def probe_chunked(s: Server) -> tuple[bool, str]:
    body = json.dumps({"model": s.model, "messages": MESSAGES, "max_tokens": 3, "temperature": 0}).encode()
    half = len(body) // 2
    chunked = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in (body[:half], body[half:])) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", s.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else None
    return status == 200 and b'"content"' in answer, f"{status}"


def probe_adapter_folder(s: Server, name: str) -> tuple[bool, str]:
    status, answer = s.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": name})
    return 400 <= status < 500, f"{status}"


def prepare_root(root: Path, adapters: list[Path], outside: Path) -> None:
    """The adapter root: a1 and a2 (loadable), two broken configs, and two ways out of the root."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for adapter in adapters[1:]:
        shutil.copytree(adapter, root / adapter.name)
    for name, config in (("no-r", {"peft_type": "LORA", "target_modules": ["q_proj"]}),
                         ("zero-r", {"peft_type": "LORA", "r": 0, "target_modules": ["q_proj"]})):
        (root / name).mkdir()
        (root / name / "adapter_config.json").write_text(json.dumps(config))
    os.symlink(outside, root / "linked-folder")
    (root / "linked-files").mkdir()
    for file in os.listdir(outside):
        os.symlink(outside / file, root / "linked-files" / file)


PROBES = [
    ("one request's pathological sampling value (temperature 1e-30, top_k 1e9)", probe_neighbours),
    ("unloading an adapter while requests for it are queued", probe_unload),
    ("a /v1/completions list of 300 prompts (the cap is 64)", probe_list),
    ("a stream whose client left", probe_gone_client),
    ("100 idle connections", probe_idle),
    ("Content-Length: -1", lambda s: probe_framing(s, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                                      b"Content-Length: -1\r\n\r\n")),
    ("Content-Length: abc", lambda s: probe_framing(s, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                                       b"Content-Length: abc\r\n\r\n")),
    ("a NUL in the path", lambda s: probe_framing(s, b"GET /v1/mod\x00els HTTP/1.1\r\nHost: x\r\n\r\n")),
    ("80 requests released together", probe_crowd),
    ("invalid UTF-8 in the body", lambda s: probe_value(
        s, b'{"model": "%s", "messages": [{"role": "user", "content": "\xff\xfe"}]}' % s.model.encode())),
    ("a lone surrogate", lambda s: probe_value(
        s, b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % s.model.encode())),
    ("max_tokens: true", lambda s: probe_value(s, json.dumps({"model": s.model, "messages": MESSAGES,
                                                              "max_tokens": True}).encode())),
    ("a 64-bit seed with n: 2", lambda s: probe_value(s, json.dumps({"model": s.model, "messages": MESSAGES,
                                                                     "seed": 2**64 - 1, "n": 2}).encode())),
    ("an image content part", lambda s: probe_value(s, json.dumps({"model": s.model, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}).encode())),
    ("a chunked body", probe_chunked),
    ("an adapter config without r", lambda s: probe_adapter_folder(s, "no-r")),
    ("an adapter config with r = 0", lambda s: probe_adapter_folder(s, "zero-r")),
    ("an adapter folder symlinked from outside the root", lambda s: probe_adapter_folder(s, "linked-folder")),
    ("adapter files symlinked from outside the root", lambda s: probe_adapter_folder(s, "linked-files")),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", action="append", default=[], help="fourbit or fourbit-static=DIR")
    p.add_argument("--work", type=Path, default=Path("/tmp/fourbit-bench-serve"))
    args = p.parse_args()
    servers = args.server or ["fourbit"]
    folder = model_folder(args.work)
    adapters = adapter_folders(args.work, folder, 3)
    outside = adapter_folders(args.work / "outside", folder, 1)[0]
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": sys.version.split()[0]}
    table = {}
    for spec in servers:
        kind, _, source = spec.partition("=")
        root = args.work / f"root-{kind}"
        prepare_root(root, adapters, outside)
        port = free_port()
        process = start(kind, source or None, folder, adapters[:1], port, args.work / f"probe-{kind}.log",
                        extra=["--adapter-root", str(root), "--max-concurrent", "64"])
        try:
            server = Server(port, process.pid, folder.name)
            for name, probe in PROBES:
                try:
                    held, detail = probe(server)
                except Exception as e:  # the probe itself broke: the server answered something unreadable
                    held, detail = False, f"{type(e).__name__}: {e}"[:120]
                table.setdefault(name, {})[spec] = {"held": held, "detail": detail}
                print(json.dumps({"server": spec, "probe": name, "held": held, "detail": detail}), flush=True)
        finally:
            stop(process)
    (results_dir() / "serve-probe.json").write_text(json.dumps({"env": env, "probes": table}, indent=2) + "\n")
    print("\n| probe | " + " | ".join(servers) + " |\n|---|" + "---|" * len(servers))
    for name, by_server in table.items():
        cells = [("held" if r["held"] else "**FAILED**") + f": {r['detail']}"
                 for r in (by_server.get(s, {"held": False, "detail": "not run"}) for s in servers)]
        print(f"| {name} | " + " | ".join(cells) + " |")


def _timed(call) -> float:
    start_time = time.perf_counter()
    call()
    return time.perf_counter() - start_time


if __name__ == "__main__":
    main()
