"""A random-weight model with Llama-3-8B's shapes, saved once as a safetensors folder, for the GPU benchmarks.

    python bench/_llama_shape.py [--layers 32] [--model-dir DIR] [--device cuda]   # build + save (once)
    python bench/_llama_shape.py --tiny --device cpu --layers 2                     # the smoke-test shape

Shared by bench/bench_train_step_gpu.py and bench/bench_decode_gpu.py (scripts in bench/ are run
as ``python bench/xxx.py``, so bench/ is on sys.path and they ``import _llama_shape``). Nothing
is downloaded: the weights are drawn with a fixed seed (transformers' own init, std
``initializer_range`` = 0.02), on the device given (the GPU by default: seconds, where the CPU
takes minutes for 8B), and written with ``save_pretrained`` (bf16; fp32 for --tiny) to a
temporary folder that is renamed into place only when complete. A folder that already holds
``bench_shape.json`` with the same settings is reused; one with different settings is an error
(pass another --model-dir). The folder has no tokenizer: both benchmarks feed token ids.

Shapes (LlamaConfig): hidden 4096, intermediate 14336, 32 heads, 8 kv heads, vocab 128256,
rope_theta 500000, max_position_embeddings 8192, rms_norm_eps 1e-5, untied lm_head, 32 layers
(``--layers N`` keeps N). ``--tiny``: hidden 64, intermediate 128, 4 heads, 2 kv heads, vocab 512,
fp32 -- for checking the scripts' logic on a CPU; its numbers mean nothing.

``--family mixtral``: Mixtral-8x7B's shapes instead (MixtralConfig: hidden 4096, 8 experts of
intermediate 14336, top-2, 32 heads, 8 kv heads, vocab 32000, rope_theta 1e6), 4 of its 32 layers
by default (6.1 B parameters, 93% of them in the experts); tiny: 4 experts of 128, top-2.

The parents call :func:`ensure_model`, which runs this file as a subprocess when the folder is
missing, so the 16 GB build never sits in the benchmark's own process.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

FULL_LAYERS = 32
SHAPE_8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
}
SHAPE_TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 512, "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
}
SHAPE_MIXTRAL = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "max_position_embeddings": 8192, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
    "num_local_experts": 8, "num_experts_per_tok": 2,
}
SHAPE_MIXTRAL_TINY = dict(SHAPE_TINY, num_local_experts=4, num_experts_per_tok=2)
MIXTRAL_LAYERS = 4
SEED = 0
MARKER = "bench_shape.json"


FAMILIES = ("llama", "mixtral")


def shape(tiny: bool, family: str = "llama") -> dict:
    if family == "mixtral":
        return dict(SHAPE_MIXTRAL_TINY if tiny else SHAPE_MIXTRAL)
    return dict(SHAPE_TINY if tiny else SHAPE_8B)


def default_layers(tiny: bool, family: str = "llama") -> int:
    return 2 if tiny else MIXTRAL_LAYERS if family == "mixtral" else FULL_LAYERS


def default_dir(layers: int, tiny: bool, family: str = "llama") -> Path:
    stem = "mixtral" if family == "mixtral" else "llama3"
    name = f"{stem}-tiny-L{layers}" if tiny else f"{stem}-8b-shape-L{layers}"
    return Path("/tmp/fourbit-bench") / name


def save_dtype(tiny: bool) -> str:
    return "float32" if tiny else "bfloat16"


def settings(layers: int, tiny: bool, family: str = "llama") -> dict:
    found = {"shape": shape(tiny, family), "layers": layers, "seed": SEED, "dtype": save_dtype(tiny),
             "initializer_range": 0.02, "tiny": tiny}
    return found if family == "llama" else dict(found, family=family)


def make_config(layers: int, tiny: bool, family: str = "llama"):
    from transformers import LlamaConfig, MixtralConfig

    s = shape(tiny, family)
    theta = s.pop("rope_theta")
    if family == "mixtral":
        kwargs = dict(s, num_hidden_layers=layers, initializer_range=0.02, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, hidden_act="silu")
        try:
            return MixtralConfig(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": theta})
        except TypeError:
            return MixtralConfig(**kwargs, rope_theta=theta)
    kwargs = dict(s, num_hidden_layers=layers, initializer_range=0.02, tie_word_embeddings=False,
                  bos_token_id=128000 if not tiny else 1, eos_token_id=128001 if not tiny else 2,
                  attention_bias=False, mlp_bias=False, hidden_act="silu")
    try:  # transformers 5.x spells the RoPE settings this way; older releases take rope_theta directly
        config = LlamaConfig(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": theta})
    except TypeError:
        config = LlamaConfig(**kwargs, rope_theta=theta)
    return config


def is_ready(folder: Path, layers: int, tiny: bool, family: str = "llama") -> bool:
    """True if ``folder`` holds this exact model; raises if it holds a different one."""
    marker = folder / MARKER
    if not marker.is_file():
        if folder.exists() and any(folder.iterdir()):
            raise SystemExit(f"{folder} exists but has no {MARKER}: not a folder this script wrote; pass another --model-dir")
        return False
    found = json.loads(marker.read_text())
    if found != settings(layers, tiny, family):
        raise SystemExit(f"{folder} holds a different model ({found}); expected {settings(layers, tiny, family)}; "
                         f"pass another --model-dir or delete it")
    return True


def build_and_save(folder: Path, layers: int, tiny: bool, device: str, family: str = "llama") -> None:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, save_dtype(tiny))
    config = make_config(layers, tiny, family)
    start = time.perf_counter()
    torch.manual_seed(SEED)
    if device == "cuda":
        torch.cuda.manual_seed_all(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    if device == "cuda":
        torch.cuda.synchronize()
    built = time.perf_counter()
    w = model.model.layers[0].self_attn.q_proj.weight
    std = w.float().std().item()
    if not 0.015 < std < 0.025:  # transformers' init must have run (not left empty / zeros)
        raise SystemExit(f"q_proj weight std is {std:.4f}, expected about 0.02: the weights were not initialized")
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB")
    (tmp / MARKER).write_text(json.dumps(settings(layers, tiny, family), indent=1) + "\n")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(folder)
    print(f"built a random {params / 1e9:.2f} B-parameter {family} model ({layers} layers, {save_dtype(tiny)}, seed {SEED}, "
          f"q_proj std {std:.4f}) on {device} in {built - start:.1f} s, saved to {folder} in "
          f"{time.perf_counter() - built:.1f} s", flush=True)


def ensure_model(folder: Path, layers: int, tiny: bool, device: str, family: str = "llama") -> None:
    """Build and save the model in a subprocess unless ``folder`` already holds it."""
    if is_ready(folder, layers, tiny, family):
        print(f"model: reusing {folder}", flush=True)
        return
    print(f"model: building {folder} (once; later runs reuse it)", flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--layers", str(layers), "--model-dir", str(folder),
           "--device", device, "--family", family] + (["--tiny"] if tiny else [])
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0 or not is_ready(folder, layers, tiny, family):
        raise SystemExit(f"building the model failed (exit {proc.returncode}); see the output above")


# ------------------------------------------------------------------------------- shared helpers
def versions() -> dict:
    out = {}
    for name in ["torch", "transformers", "bitsandbytes", "peft", "triton", "accelerate", "safetensors"]:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def environment(device: str) -> dict:
    """Device name, library versions, date and the exact command; imports torch only for the GPU name."""
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    if device == "cpu":
        from fourbit.precision import cpu_kind

        name = f"{name} ({cpu_kind()})"
    if device == "cuda":  # nvidia-smi, so that the parent creates no CUDA context of its own
        try:
            name = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                  check=False, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
            name = f"{name} (name, memory, driver)"
        except (OSError, IndexError, subprocess.SubprocessError):
            name = "a CUDA GPU (nvidia-smi unavailable; see the children's lines)"
    fourbit_version = "unknown"
    try:
        import fourbit

        fourbit_version = f"{fourbit.__version__} ({Path(fourbit.__file__).parent})"
    except Exception as e:
        fourbit_version = f"not importable ({type(e).__name__}: {e})"
    return {
        "device": name, "python": platform.python_version(), **versions(), "fourbit": fourbit_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [f"python {sys.argv[0]}", *sys.argv[1:]]),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
    }


def out_path(name: str) -> Path:
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / name


def run_streaming(cmd: list[str], timeout: float) -> tuple[dict | None, int | None]:
    """Run ``cmd`` in its own process group, echoing its stdout as it comes, until it ends or
    ``timeout`` seconds pass (then the whole group is killed, compile workers included).
    Returns (the dict on its last ``RESULT {json}`` line or None, its exit code or None if killed)."""
    import selectors
    import signal

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
    result, deadline = None, time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(cmd, timeout)
            if not sel.select(timeout=min(left, 5)):
                continue
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("RESULT "):
                result = json.loads(line[7:])
            else:
                print(line, end="", flush=True)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call started, and nothing else
        except ProcessLookupError:
            pass
        proc.wait()
        return result, None
    finally:
        sel.close()
        proc.stdout.close()
    return result, proc.returncode


def run_as_child(child, args) -> None:
    """In a benchmark's subprocess: run ``child(name, args)``; a traceback and exit 1 if it fails."""
    import traceback

    try:
        child(args.child, args)
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        sys.exit(1)


def print_header(args) -> dict:
    """Print the environment and the model's layer count; return the environment."""
    env = environment(args.device)
    for k, v in env.items():
        print(f"{k:>16}: {v}")
    print(layers_note(args.layers, args.tiny, getattr(args, "family", "llama")))
    return env


def layers_note(layers: int, tiny: bool, family: str = "llama") -> str:
    if tiny:
        return f"layers: {layers} (TINY shape: a logic smoke test, its numbers mean nothing)"
    full = "Mixtral-8x7B" if family == "mixtral" else "8B"
    if layers < FULL_LAYERS:
        return f"layers: {layers} of {FULL_LAYERS} (NOT the full {full} model)"
    return f"layers: {layers} of {FULL_LAYERS} (full {full} shape)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--family", choices=FAMILIES, default="llama")
    args = p.parse_args()
    layers = args.layers or default_layers(args.tiny, args.family)
    folder = args.model_dir or default_dir(layers, args.tiny, args.family)
    if is_ready(folder, layers, args.tiny, args.family):
        print(f"{folder} already holds this model")
        return
    build_and_save(folder, layers, args.tiny, args.device, args.family)


if __name__ == "__main__":
    main()
