"""GPU timing shared by the benchmarks: CUDA-graph replays between CUDA events.

A call of a small kernel from Python costs more CPU time (dispatch, launch) than the kernel
takes on the GPU; timing an eager loop then measures the CPU. Capturing the calls in one
CUDA graph and replaying it leaves only GPU time. Calls rotate over several input copies so
that none is served from L2 (../shared/PERF.md, the device tool's METHOD.md).
"""

from __future__ import annotations

import statistics

import torch


def time_per_call(fn, inputs, repeats: int) -> tuple[float, bool]:
    """Median seconds per call of ``fn`` over ``inputs`` in turn; (time, captured in a CUDA graph).

    A method that cannot be captured is timed as an eager loop instead (the flag says so).
    """
    for c in inputs:  # warm-up: compilation, autotuning, workspace allocation
        fn(c)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for c in inputs:
                fn(c)
        replay, captured = graph.replay, True
    except Exception:
        torch.cuda.synchronize()
        replay, captured = (lambda: [fn(c) for c in inputs]), False
    replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(inputs))
    return statistics.median(times), captured
