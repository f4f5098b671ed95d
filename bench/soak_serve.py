"""A bounded soak of `fourbit serve`: a fixed mix of normal, cancelled, malformed and
adapter-switching requests from many clients, loopback only; every answer checked.

    python bench/soak_serve.py [--requests 600] [--clients 16] [--max-tokens 24]

Question: after a few minutes of the traffic a public server gets, is every well-formed request
still answered correctly, and are the server's memory and threads where they started?

Method
- `fourbit serve` on the embedded model in its own process (the folder and 3 random adapters that
  bench/bench_serve_load.py writes in --work), with --adapter-root holding the adapters and at
  most 2 loaded at once, so that requests naming the third evict the least recently used. Compute
  in float32 (FOURBIT_CPU_BF16=0 on a bf16 CPU): there a row's greedy answer does not depend on
  the rows beside it. In bf16 the batched products round differently from a lone row's, and
  greedy answers part at near-ties (59 of 208 after a few tokens in a run here): that is bf16,
  not the engine, and the engine tests check the same in float32.
- First, the reference: each (question, adapter) pair asked once, alone, greedy.
- Then --requests requests from --clients threads, in a fixed shuffled order (seeded): 55% normal
  (chat or completions, streaming or not, base or an adapter: the answer must equal the
  reference, and the same pair's completions answer must equal its first one), 15% cancelled
  (a stream closed after its first chunk), 15% malformed (bad JSON, bad values, wrong types,
  oversize bodies, unknown routes: each must get a 4xx in OpenAI's error shape), 15% adapter
  changes (unload or load through the API, and requests naming an adapter that is loaded on
  first use). A request that names an adapter another client is unloading may fail with a 4xx
  naming it; that is counted, not an error.
- Every second: the server's resident memory (VmRSS) and thread count from /proc. Reported: the
  counts by kind and outcome, wrong answers (must be 0), 5xx answers (must be 0), RSS and threads
  in the first and last tenth of the run, and the engine's counters from /metrics.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import random
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve_load import QUESTIONS, adapter_folders, free_port, model_folder

MALFORMED = [
    (b"{not json", "/v1/chat/completions"),
    (b'{"messages": [{"role": "user", "content": "\xff"}]}', "/v1/chat/completions"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}).encode(), "/v1/chat/completions"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "/v1/chat/completions"),
    (json.dumps({"prompt": [[]]}).encode(), "/v1/completions"),
    (json.dumps({"prompt": "x" * 70_000}).encode(), "/v1/completions"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 99}).encode(), "/v1/chat/completions"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "../etc"}).encode(), "/v1/chat/completions"),
    (b"{}", "/v1/nowhere"),
]


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request(method, path, body, {"Content-Type": "application/json"} if body is not None else {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, data


def ask(port: int, kind: str, model: str, question: str, max_tokens: int, stream: bool) -> tuple[int, str]:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": question}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = question
        path = "/v1/completions"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        return response.status, response.read().decode(errors="replace")
    if not stream:
        choice = json.loads(response.read())["choices"][0]
        return 200, choice["message"]["content"] if kind == "chat" else choice["text"]
    text = []
    for line in response:
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if "error" in event:  # the stream had begun: its failure comes as an event
                connection.close()
                return "5xx-in-stream" if event["error"]["type"] == "server_error" else "4xx-in-stream", ""
            for choice in event.get("choices", []):
                text.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
    connection.close()
    return 200, "".join(text)


def cancel_stream(port: int, model: str, question: str) -> None:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 200,
                       "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        seen = b""
        while b"data:" not in seen:
            chunk = sock.recv(4096)
            if not chunk:
                break
            seen += chunk


def proc_status(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["Threads"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/fourbit-bench-serve"))
    args = p.parse_args()
    import subprocess

    args.work.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args.work)
    adapter_folders(args.work, folder, 3)
    root = args.work / "adapters"
    port = free_port()
    log = args.work / "soak-server.log"
    server = subprocess.Popen([sys.executable, "-m", "fourbit", "serve", str(folder), "--port", str(port),
                               "--adapter-root", str(root), "--max-adapters", "2", "--max-concurrent", "64"],
                              stdout=log.open("w"), stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", "FOURBIT_CPU_BF16": "0"})
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if request(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start; see {log}")
            time.sleep(1)
        report = soak(port, server.pid, folder.name, args)
    finally:
        server.terminate()
        server.wait(120)
    report["env"] = {"python": sys.version.split()[0], "cpu_count": os.cpu_count(),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak-serve.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if report["wrong_answers"] or report["server_errors"]:
        raise SystemExit("the soak found wrong answers or 5xx responses")


def soak(port: int, pid: int, base: str, args) -> dict:
    models = [base, "a0", "a1", "a2"]
    reference = {}
    for model in models:
        for question in QUESTIONS[:4]:
            for kind in ("chat", "completions"):
                status, text = ask(port, kind, model, question, args.max_tokens, stream=False)
                assert status == 200, (status, text)
                reference[kind, model, question] = text
    rng = random.Random(args.seed)
    plan = (["normal"] * 55 + ["cancelled"] * 15 + ["malformed"] * 15 + ["adapters"] * 15) * (args.requests // 100 + 1)
    plan = plan[:args.requests]
    rng.shuffle(plan)
    jobs = [(kind, rng.random(), rng.choice(models), rng.choice(QUESTIONS[:4]), rng.choice(("chat", "completions")),
             rng.random() < 0.5, rng.choice(MALFORMED)) for kind in plan]
    outcomes, wrong, samples, lock = Counter(), [], [], threading.Lock()
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append((time.monotonic(), *proc_status(pid)))
            time.sleep(1)

    def run(job):
        kind, coin, model, question, api, stream, (bad_body, bad_path) = job
        if kind == "normal":
            status, text = ask(port, api, model, question, args.max_tokens, stream)
            if status == 200 and text != reference[api, model, question]:
                with lock:
                    wrong.append({"api": api, "model": model, "question": question, "got": text,
                                  "want": reference[api, model, question]})
            return f"normal {status}"
        if kind == "cancelled":
            cancel_stream(port, model, question)
            return "cancelled"
        if kind == "malformed":
            return f"malformed {request(port, 'POST', bad_path, bad_body)[0]}"
        if coin < 0.3:
            status = request(port, "POST", "/v1/unload_lora_adapter", json.dumps({"lora_name": model}).encode())[0]
            return f"unload {status}"
        status, _ = ask(port, "chat", rng_adapter(coin), question, args.max_tokens, False)
        return f"adapter-on-first-use {status}"

    def rng_adapter(coin):
        return ("a0", "a1", "a2")[int(coin * 10) % 3]

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.monotonic()
    queue = list(jobs)

    def client():
        while True:
            with lock:
                if not queue:
                    return
                job = queue.pop()
            outcome = run(job)
            with lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - start
    time.sleep(2)
    done.set()
    sampler.join()
    tenth = max(1, len(samples) // 10)
    first, last = samples[:tenth], samples[-tenth:]
    metrics = request(port, "GET", "/metrics")[1].decode()
    engine = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("fourbit_engine_") and not line.startswith("#")}
    return {"requests": len(jobs), "clients": args.clients, "seconds": seconds, "outcomes": dict(sorted(outcomes.items())),
            "wrong_answers": len(wrong), "wrong_examples": wrong[:3],
            "server_errors": sum(n for k, n in outcomes.items() if k.split()[-1].startswith("5")),  # 5xx-in-stream too
            "rss_mib_first_tenth": max(s[1] for s in first), "rss_mib_last_tenth": max(s[1] for s in last),
            "threads_first_tenth": max(s[2] for s in first), "threads_last_tenth": max(s[2] for s in last),
            "threads_after": proc_status(pid)[1], "engine": engine}


if __name__ == "__main__":
    main()
