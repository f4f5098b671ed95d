"""tools/inspect_sass.py (a developer tool, not installed): the K-loop reader on hand-written SASS,
and one real sm_90 compile.

The compile uses ptxas and cuobjdump from Triton's wheel (no GPU); it checks what the tool
reports against facts of the kernel source: the gemv gathers the code table with a global load
a weight, and multiplies in float32.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS_DIR = Path(__file__).resolve().parents[2] / "tools"
pytest.importorskip("fourbit.kernels.triton.matmul_4bit")

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                  /* 0x00000a0000017a02 */
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;           /* 0x0000000404027981 */
        /*0020*/               @P0 LEA R6, R2, UR8, 0x2 ;                  /* 0x0000000802067c11 */
        /*0030*/                   LDS R7, [R6] ;                          /* 0x0000000006077984 */
        /*0040*/                   FFMA R8, R7, R3, R8 ;                   /* 0x0000000307087223 */
        /*0050*/              @!P1 BRA 0x20 ;                              /* 0xfffffffc00388947 */
        /*0060*/                   STG.E desc[UR4][R10.64], R8 ;          /* 0x0000000a08007986 */
        /*0070*/                   EXIT ;                                  /* 0x000000000000794d */
        /*0080*/                   BRA 0x80;                               /* 0xfffffffc00fc7947 */
"""


@pytest.fixture(scope="module")
def inspect_sass():
    sys.path.insert(0, str(TOOLS_DIR))
    try:
        yield importlib.import_module("inspect_sass")
    finally:
        sys.path.remove(str(TOOLS_DIR))


def test_the_loop_is_the_span_of_the_longest_backward_branch(inspect_sass):
    # 0x20..0x50: LEA (predicated), LDS, FFMA, BRA; the LDG before it and the self-branch at
    # 0x80 (a zero-length loop) are not the K loop.
    assert inspect_sass.loop_opcodes(SASS) == {"LEA": 1, "LDS": 1, "FFMA": 1, "BRA": 1}


def test_a_sass_without_a_loop_is_refused(inspect_sass):
    with pytest.raises(ValueError, match="no backward branch"):
        inspect_sass.loop_opcodes(SASS.replace("BRA 0x20", "BRA 0x60"))


def test_the_gemv_compiled_for_sm90_reads_its_code_table_from_global_memory(inspect_sass):
    if not (inspect_sass.TOOLS / "cuobjdump").exists():
        pytest.skip("this Triton wheel carries no cuobjdump")
    # Compiling needs the kernels as JIT functions: a child process without the interpreter
    # that tests/conftest.py turns on.
    script = (
        "import json, inspect_sass\n"
        "from fourbit.kernels.triton.matmul_4bit import Config\n"
        "print(json.dumps(inspect_sass.inspect(Config(block_n=16, nb=2), 64)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(TOOLS_DIR), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.splitlines()[-1])
    # Each thread handles 16 * 2 * 64 / 128 = 16 weights a step, a table read each (global
    # loads, as are the codes, x and the scales), and no shared-memory traffic.
    assert row["opcodes"].get("LDG", 0) >= 16 and row["opcodes"].get("LDS", 0) == 0, row["opcodes"]
    assert row["opcodes"].get("FFMA", 0) + row["opcodes"].get("FMUL", 0) > 0
    assert row["per_weight"] == pytest.approx(row["loop_instructions"] / 16)
    assert row["registers"] > 0 and row["stack"] == 0
