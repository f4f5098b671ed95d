"""OpenAI-compatible servers under concurrent streaming load: fourbit serve against its peers.

    python bench/bench_serve_load.py --server fourbit [--server fourbit-static=DIR] [--server transformers]
        [--concurrency 1,4,16,64] [--adapters 0,4] [--max-tokens 48] [--requests-per-client 2]

Question: how many requests a second, and how soon the first token and each next one, when N
clients stream greedy chat completions at once; with the base alone and with 4 adapters mixed
(request i names adapter i mod 4). Targets (issue 18): at 16 clients, 2x the requests/s of
``transformers serve --continuous-batching --quantization bnb-4bit`` with a time to first token
p90 of at most 0.5 s; a short request finishing in about its own decode time next to long ones.

Method
- Each server is started as its own process on a free port, on the embedded SmolLM2-135M-Instruct
  (a transformers folder written from the GGUF once, in --work), and waited for on /health; all
  are driven by this one client: N threads, each sending --requests-per-client requests in turn
  (a new one as soon as its previous answer ends), streaming, temperature 0, max_tokens
  --max-tokens; an answer ends at its end of turn or at max_tokens (greedy on the same weights:
  the same lengths on every server, up to the peer's different 4-bit rounding).
- Servers: ``fourbit`` (this checkout: continuous batching), ``fourbit-static=DIR`` (another
  checkout of fourbit, e.g. a git worktree of the static-batching engine), ``transformers``
  (``transformers serve --continuous-batching --quantization bnb-4bit``, base only: it serves no
  adapters by name).
- Measured per request on the client: time to first token (request sent -> first content chunk),
  inter-token latency (between content chunks), end. Reported: requests/s and tokens/s over the
  whole level, TTFT p50/p90/p99, ITL p50/p99.
- Then the short-next-to-long probe: 3 long requests (--max-tokens x 4) streaming, a short one
  (8 tokens) sent when they have started; its time against the same short request alone.
- Table last; JSON to $OUT or bench/results/serve-load.json.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

QUESTIONS = ["Tell me about the ocean.", "Name three colours.", "What is a prime number?", "Describe a cat.",
             "Why is the sky blue?", "Give me a recipe idea.", "What is rain?", "Explain gravity briefly."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_folder(work: Path) -> Path:
    """The embedded model as a transformers folder (float32 weights), written once."""
    folder = work / "smollm2-135m-instruct"
    if not (folder / "config.json").exists():
        import fourbit

        model, tokenizer = fourbit.load_model(None, quantization=None, torch_dtype="float32")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def adapter_folders(work: Path, folder: Path, count: int) -> list[Path]:
    """``count`` random LoRA adapters (r 16, all linear layers) for the model, written once."""
    import torch

    import fourbit
    from fourbit.nn.lora import lora_adapters

    paths = [work / "adapters" / f"a{i}" for i in range(count)]
    for i, path in enumerate(paths):
        if not path.exists():
            model, _ = fourbit.load_model(folder, quantization=None, torch_dtype="float32")
            torch.manual_seed(i)
            fourbit.add_lora(model, r=16, alpha=32, verbose=False)
            with torch.no_grad():
                for adapter in lora_adapters(model).values():
                    adapter.lora_B.weight.normal_(std=0.01)
            fourbit.save_adapter(model, path)
    return paths


def start(kind: str, source: str | None, folder: Path, adapters: list[Path], port: int, log: Path,
          extra: list[str] = ()) -> subprocess.Popen:
    """A server as its own process, once it answers /health; ``extra``: more fourbit serve arguments."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if kind == "transformers":
        command = ["transformers", "serve", str(folder), "--continuous-batching", "--quantization", "bnb-4bit",
                   "--port", str(port), "--host", "127.0.0.1"]
    else:
        command = [sys.executable, "-m", "fourbit", "serve", str(folder), "--port", str(port), "--max-concurrent", "256"]
        command += [arg for i, a in enumerate(adapters) for arg in ("--adapter", f"a{i}={a}")] + list(extra)
        if source:
            env["PYTHONPATH"] = str(Path(source) / "src")
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{kind} exited before serving; see {log}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit(f"{kind} did not answer /health in 600 s; see {log}")


def stop(process: subprocess.Popen) -> None:
    """Ask a server started by :func:`start` to stop; kill it if it has not within a minute."""
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def results_dir() -> Path:
    """Where a benchmark's JSON goes: $OUT if set, else bench/results."""
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def stream_one(port: int, model: str, question: str, max_tokens: int) -> dict:
    """One streaming chat request: the client's clock for its first and next content chunks."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        return {"status": response.status, "error": response.read()[:200].decode(errors="replace")}
    stamps, text = [], []
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        for choice in chunk.get("choices", []):
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                stamps.append(time.perf_counter())
                text.append(piece)
    end = time.perf_counter()
    connection.close()
    return {"status": 200, "ttft": stamps[0] - sent if stamps else None, "end": end - sent,
            "gaps": [b - a for a, b in zip(stamps, stamps[1:])], "chunks": len(stamps), "text": "".join(text)}


def level(port: int, models: list[str], clients: int, per_client: int, max_tokens: int) -> dict:
    results, lock = [], threading.Lock()

    def client(c: int) -> None:
        for k in range(per_client):
            i = c * per_client + k
            try:
                answer = stream_one(port, models[i % len(models)], QUESTIONS[i % len(QUESTIONS)], max_tokens)
            except OSError as e:  # a reset connection (a full listen backlog), a timeout
                answer = {"status": type(e).__name__, "error": str(e)}
            with lock:
                results.append(answer)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    ok = [r for r in results if r["status"] == 200 and r["ttft"] is not None]
    ttft, gaps = [r["ttft"] for r in ok], [g for r in ok for g in r["gaps"]]
    return {"clients": clients, "requests": len(results), "ok": len(ok), "seconds": seconds,
            "requests_per_s": len(ok) / seconds, "chunks_per_s": sum(r["chunks"] for r in ok) / seconds,
            "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99),
            "errors": sorted({f"{r['status']}: {r.get('error', '')[:80]}" for r in results if r["status"] != 200})}


def short_next_to_long(port: int, model: str, max_tokens: int) -> dict:
    alone = stream_one(port, model, QUESTIONS[1], 8)["end"]
    longs = [threading.Thread(target=stream_one, args=(port, model, QUESTIONS[0], max_tokens * 4)) for _ in range(3)]
    for t in longs:
        t.start()
    time.sleep(1.0)
    beside = stream_one(port, model, QUESTIONS[1], 8)["end"]
    for t in longs:
        t.join()
    return {"short_alone_s": alone, "short_beside_long_s": beside}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", action="append", default=[], help="fourbit, fourbit-static=DIR or transformers")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--adapters", default="0,4", help="adapter counts to run fourbit servers with (0: the base)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/fourbit-bench-serve"))
    args = p.parse_args()
    servers = args.server or ["fourbit"]
    args.work.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args.work)
    import torch
    import transformers

    env = {"cpu": _cpu(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": sys.version.split()[0],
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(env), flush=True)
    rows = []
    for spec in servers:
        kind, _, source = spec.partition("=")
        for count in [int(a) for a in args.adapters.split(",")] if kind != "transformers" else [0]:
            adapters = adapter_folders(args.work, folder, count) if count else []
            port = free_port()
            log = args.work / f"{kind}-{count}.log"
            process = start(kind, source or None, folder, adapters, port, log)
            try:
                models = [f"a{i}" for i in range(count)] or [folder.name if kind != "transformers" else str(folder)]
                stream_one(port, models[0], QUESTIONS[0], 4)  # warm-up
                for clients in [int(c) for c in args.concurrency.split(",")]:
                    row = {"server": spec, "adapters": count,
                           **level(port, models, clients, args.requests_per_client, args.max_tokens)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                probe = {"server": spec, "adapters": count, **short_next_to_long(port, models[0], args.max_tokens)}
                print(json.dumps(probe), flush=True)
                rows.append(probe)
            finally:
                stop(process)

    path = results_dir() / "serve-load.json"
    path.write_text(json.dumps({"env": env, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                               indent=2) + "\n")
    print(f"\nstreaming chat, greedy, max_tokens {args.max_tokens}, {args.requests_per_client} requests per client "
          f"({path})")
    print(f"{'server':<22} {'adapters':>8} {'clients':>7} {'req/s':>7} {'chunk/s':>8} {'ttft p50':>9} {'p90':>6} "
          f"{'p99':>6} {'itl p50':>8} {'p99':>6} {'ok':>7}")
    for r in rows:
        if "clients" in r:
            print(f"{r['server']:<22} {r['adapters']:>8} {r['clients']:>7} {r['requests_per_s']:>7.2f} "
                  f"{r['chunks_per_s']:>8.1f} {_s(r['ttft_p50']):>9} {_s(r['ttft_p90']):>6} {_s(r['ttft_p99']):>6} "
                  f"{_s(r['itl_p50']):>8} {_s(r['itl_p99']):>6} {r['ok']:>3}/{r['requests']:<3}")
        else:
            print(f"{r['server']:<22} {r['adapters']:>8}  short request alone {r['short_alone_s']:.2f} s, "
                  f"beside 3 long ones {r['short_beside_long_s']:.2f} s")


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _cpu() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    kind = "AVX512-BF16" if "avx512_bf16" in flags else "AVX2" if "avx2" in flags else "other"
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    return f"{name} ({kind}), {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
