"""One rank of test_distributed.py's 2-process runs, started by torchrun (gloo, CPU).

    torchrun --standalone --nproc-per-node 2 distributed_worker.py CONFIG.yaml RESULTS_DIR [--train-only]

Trains the config with strategy fsdp (into RESULTS_DIR/fsdp; with --train-only, nothing else),
evaluates with ddp (each rank answering half), then feeds the ranks bad input; records, per
rank, the evaluation and the error each scenario raised (or "no error") in RESULTS_DIR/rank-R.json.
"""

import json
import os
import sys
from pathlib import Path

from fourbit.train.config import load_config
from fourbit.train.distributed import init_ranks
from fourbit.train.run import run


def outcome(fn) -> str:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def main(config_path: str, results: str, *flags: str) -> None:
    rank = int(os.environ["RANK"])
    out = Path(results)
    base = load_config(config_path)
    report = {}

    fsdp = load_config(config_path, {"strategy": "fsdp", "output_dir": str(out / "fsdp")})
    run(fsdp)
    if "--train-only" in flags:
        return

    ranks = init_ranks(base)

    def one_rank_fails():
        with ranks.all_or_none(base):
            if rank == 1:
                raise ValueError("rank 1's own check failed")

    report["one_rank_fails"] = outcome(one_rank_fails)
    report["indivisible_global_batch"] = outcome(
        lambda: run(load_config(config_path, {"global_batch_size": 6, "output_dir": str(out / "gbs")})))
    report["different_configs"] = outcome(
        lambda: run(load_config(config_path, {"learning_rate": 1e-3 * (rank + 1), "output_dir": str(out / "lr")})))
    report["fsdp_8bit_optimizer"] = outcome(
        lambda: run(load_config(config_path, {"strategy": "fsdp", "optim": "adamw_8bit", "output_dir": str(out / "8bit")})))
    report["fsdp_eval"] = outcome(lambda: run(load_config(config_path, {
        "strategy": "fsdp", "eval_dataset": fsdp.dataset, "output_dir": str(out / "eval")})))
    evaluated = run(load_config(config_path, {"eval_dataset": base.dataset, "max_steps": 1,
                                              "output_dir": str(out / "ddp-eval")})).eval_before
    report["ddp_eval"] = {"total": evaluated["total"], "answers": evaluated["answers"]}
    report["nccl_without_cuda"] = outcome(lambda: init_ranks(load_config(config_path, {"ddp_backend": "nccl"})))
    (out / f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
