"""Machine code of the fused 4-bit gemv for an H100, read on any machine: no GPU needed.

    python tools/inspect_sass.py [--blocksize 64] [--launch BLOCK_N,NB,WARPS ...]

Question: for the op's launch shape (or those given), how many machine instructions does the K
loop spend per weight, of which kinds, and how many registers does a thread hold? The device
tool's METHOD.md: "read what costs no device time"; at M = 1 the gemv is bound by per-weight
instructions, not bytes (notes/gpu/README.md), so this count is the number a kernel change must
move.

Method
- ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (sm_90), with the specializations a real
  launch gets: pointers 16-byte aligned, N, K and the row strides divisible by 16 (Llama shapes).
  Triton's own wheel carries ptxas and cuobjdump, so this runs on a CPU-only machine.
- The K loop is the longest backward branch of the SASS; its instructions, by opcode, are
  divided by the weights each thread handles per loop step (block_n x nb x blocksize / threads).
- Registers and stack (spills) from ``cuobjdump -res-usage``; "async" counts LDGSTS (cp.async
  copies into shared memory: Triton's software pipeliner at work).

Limits: static counts, one Triton version (this machine's; the GPU machine's may schedule
differently). They say nothing of latency, stalls or bank conflicts: a guide for what to time
next, not a timing. Table last; JSON to bench/results/inspect-sass.json (or $OUT).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fourbit.kernels.triton import matmul_4bit as fused

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
TARGET = GPUTarget("cuda", 90, 32)
POINTERS = ["x_ptr", "packed_ptr", "absmax_ptr", "code_ptr", "nested_absmax_ptr", "nested_code_ptr", "offset_ptr",
            "bias_ptr", "out_ptr"]
POINTER_TYPES = ["*bf16", "*u8", "*u8", "*fp32", "*fp32", "*fp32", "*fp32", "*bf16", "*bf16"]
ALIGNED_INTS = {"N", "K", "stride_xm", "stride_om"}  # what a launch on Llama-shaped tensors specializes
KINDS = {  # opcode -> column of the table
    "LDG": "global", "LDGSTS": "async", "LDS": "shared", "LDSM": "shared", "STS": "shared",
    "FFMA": "fp32", "FMUL": "fp32", "FADD": "fp32", "HMMA": "mma", "HGMMA": "mma",
    "LEA": "address", "IMAD": "address", "IADD3": "address", "VIADD": "address",
    "LOP3": "nibble", "SHF": "nibble", "PRMT": "nibble", "F2FP": "convert", "SHFL": "shuffle", "BAR": "barrier",
}
COLUMNS = ["global", "async", "shared", "fp32", "mma", "address", "nibble", "convert", "shuffle", "barrier", "other"]


def compile_for_h100(config: fused.Config, blocksize: int, double_quant: bool = True):
    """The kernel ``config`` launches, compiled for sm_90: (cubin bytes, Triton's metadata)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreted functions; unset it to compile them")
    kernel = fused._gemv_4bit_kernel
    ints = ["N", "K", "stride_xm", "stride_om", "blocks_per_split"]
    signature = dict(zip(POINTERS, POINTER_TYPES)) | {name: "i32" for name in ints}
    constants = dict(BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=256, DOUBLE_QUANT=double_quant, HAS_BIAS=False,
                     BLOCK_N=config.block_n, NB=config.nb, SPLIT=False)
    signature |= {name: "constexpr" for name in constants}
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in POINTERS + sorted(ALIGNED_INTS)}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=TARGET,
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return compiled.asm["cubin"], compiled.metadata


def sass_and_resources(cubin: bytes) -> tuple[str, dict]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([TOOLS / "cuobjdump", "-sass", f.name], check=True, capture_output=True, text=True).stdout
        usage = subprocess.run([TOOLS / "cuobjdump", "-res-usage", f.name], check=True, capture_output=True,
                               text=True).stdout
    registers, stack = re.search(r"REG:(\d+)\s+STACK:(\d+)", usage).groups()
    return sass, {"registers": int(registers), "stack": int(stack)}


def loop_opcodes(sass: str) -> collections.Counter:
    """Opcodes (predicates and modifiers dropped) of the longest loop: the K loop."""
    code = [(int(a, 16), text.strip()) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(target, 16), address) for address, text in code if "BRA" in text
             for target in re.findall(r"0x[0-9a-f]+", text) if int(target, 16) < address]
    if not loops:
        raise ValueError("no backward branch in the SASS: the K loop was not found")
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    opcodes = (re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
               for address, text in code if start <= address <= end)
    return collections.Counter(opcodes)


def inspect(config: fused.Config, blocksize: int) -> dict:
    cubin, _ = compile_for_h100(config, blocksize)
    sass, resources = sass_and_resources(cubin)
    opcodes = loop_opcodes(sass)
    weights_per_thread = config.block_n * config.nb * blocksize / (32 * config.num_warps)
    kinds = collections.Counter()
    for opcode, count in opcodes.items():
        kinds[KINDS.get(opcode, "other")] += count
    total = sum(opcodes.values())
    return {"config": str(config), **resources, "loop_instructions": total,
            "per_weight": total / weights_per_thread,
            "per_weight_by_kind": {k: kinds[k] / weights_per_thread for k in COLUMNS},
            "opcodes": dict(opcodes.most_common())}


def label(config: fused.Config) -> str:
    return f"gemv n{config.block_n} nb{config.nb} w{config.num_warps}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--launch", nargs="*", default=[], metavar="BLOCK_N,NB,WARPS",
                   help="launch shapes to read (default: the op's, fused.GEMV)")
    args = p.parse_args()
    configs = [fused.Config(*map(int, text.split(","))) for text in args.launch] or [fused.GEMV]
    env = {"triton": triton.__version__, "target": "sm_90 (H100), compiled here without a GPU",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    rows = []
    for config in configs:
        rows.append(inspect(config, args.blocksize))
        print(f"{label(config):<44} {rows[-1]['per_weight']:5.2f} instructions a weight, "
              f"{rows[-1]['registers']} registers", flush=True)

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "inspect-sass.json"
    path.write_text(json.dumps({"env": env, "args": vars(args), "rows": rows}, indent=2) + "\n")

    print(f"\nK-loop SASS per weight a thread handles, block size {args.blocksize}, NF4 + double quant; "
          f"triton {env['triton']}, sm_90 ({path})")
    print(f"{'launch shape':<44} {'regs':>4} {'stack':>5} {'total':>6} " + " ".join(f"{c:>7}" for c in COLUMNS))
    for config, row in zip(configs, rows):
        kinds = row["per_weight_by_kind"]
        print(f"{label(config):<44} {row['registers']:>4} {row['stack']:>5} {row['per_weight']:>6.2f} "
              + " ".join(f"{kinds[c]:>7.2f}" for c in COLUMNS))


if __name__ == "__main__":
    main()
