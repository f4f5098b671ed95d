"""QLoRA on 2 processes (torchrun, gloo, CPU) against 1 process: train/distributed.py.

Launches of ``torchrun --standalone --nproc-per-node 2`` (a free port each, a timeout so a
hang fails instead of blocking CI): ``-m fourbit train`` with DDP, and distributed_worker.py
with FSDP2 followed by the bad inputs. Training runs at both compute dtypes, float32 and
bfloat16 (what "auto" picks on CPUs with native bf16): every strategy computes the LoRA branch
in the adapter's float32, so the strategy must not change the result at either. The config sets
global_batch_size 8 with 2 examples per micro-batch: 2 ranks x accumulation 2 and 1 process x
accumulation 4 take the same micro-batches per step. Of 13 examples 3 are held out (val_size)
and 10 make 5 micro-batches an epoch, so every other step has one micro-batch (rank 1 repeats it
with weight 0). The eval loss at steps 2 and 4 takes the 3 held-out examples one a batch: rank 0
two, rank 1 one and a weight-0 repeat (under FSDP a rank that skipped a forward would hang).

Tolerances. Losses, gradient norms and eval losses: rel 1e-5, float32 summation order (the ranks' partial
sums are added in another order). Adapters: atol 1e-4. Adam divides each gradient element by
its running RMS, so a rounding-level difference in a gradient moves that element's update by
lr times its relative error: negligible for most elements, larger for gradients near rounding
level, and never more than lr x steps = 0.02. Measured: 9e-7 (DDP) and 4e-5 (FSDP2, whose
AdamW is torch's over DTensor shards) on weights up to 0.14. A wrong gradient (a micro-batch
lost or counted twice, a shard of the 4-bit weights gathered wrong) moves the adapter by about
lr = 5e-3 per step; a wrong scale of the gradient, to which Adam is blind, shows in the norms.
At bfloat16 compute the same bounds hold: each micro-batch's forward and backward are the same
operations on the same data in one process and on a rank, and only the float32 sums over
micro-batches and ranks are ordered differently. (Gathering the LoRA weights in bf16 under
FSDP2, as fourbit once did, moved the adapter 8e-3 from one process's.) For that, the
one-process runs here take their loss through the model's forward, as the ranks do: on its own
a process fuses the head into the loss (train/loss.py), which at bf16 rounds the head's
gradient before its scale by 1/tokens instead of after (tests/train/test_loss.py covers that
path; here it moved a loss by 8e-4 relative over 4 steps at lr 5e-3).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fourbit.train import loss
from fourbit.train.config import load_config
from fourbit.train.distributed import Ranks
from fourbit.train.parallel import micro_batches_per_step, shard
from fourbit.train.run import run

WORKER = Path(__file__).with_name("distributed_worker.py")
LAUNCH_TIMEOUT = 150  # seconds for one 2-process launch; each takes ~15 s on a 2-core machine
ATOL = 1e-4  # see the module docstring


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc-per-node 2 ARGS``; on timeout kill its whole process group."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU, also on a GPU machine
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"2-process run hung for {LAUNCH_TIMEOUT} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, chat_tokenizer, make_tiny_llama):
    return write_setup(tmp_path_factory.mktemp("distributed"), chat_tokenizer, make_tiny_llama, "float32")


def write_setup(root: Path, chat_tokenizer, make_tiny_llama, compute_dtype: str) -> Path:
    make_tiny_llama(root / "model", vocab_size=len(chat_tokenizer), max_position_embeddings=256, initializer_range=0.5)
    chat_tokenizer.save_pretrained(root / "model")
    words = ["apple", "river", "stone", "cloud", "maple", "ember", "harbor", "violet", "copper", "meadow", "amber",
             "falcon", "willow"]
    (root / "echo.json").write_text(json.dumps([{"instruction": "Repeat the word.", "input": w, "output": w} for w in words]))
    settings = {
        "model_name_or_path": str(root / "model"), "dataset": str(root / "echo.json"), "output_dir": str(root / "ddp"),
        "compute_dtype": compute_dtype, "lora_rank": 4, "learning_rate": 5e-3, "lr_scheduler_type": "constant",
        "per_device_train_batch_size": 2, "global_batch_size": 8, "max_steps": 4, "save_steps": 2, "cutoff_len": 64,
        "seed": 3, "gradient_checkpointing": True, "plot_loss": False, "ddp_timeout": 60, "val_size": 3,
        "per_device_eval_batch_size": 1,
    }
    (root / "config.yaml").write_text(yaml.safe_dump(settings))
    return root


def run_one_process(config):
    """``run(config)`` in this process, its loss through the model's forward (see the docstring)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loss, "fused_head", lambda model: None)
        return run(config)


@pytest.fixture(scope="module")
def one_process(setup):
    return run_one_process(load_config(setup / "config.yaml", {"output_dir": str(setup / "one")}))


@pytest.fixture(scope="module")
def ddp(setup):
    result = torchrun("-m", "fourbit", "train", "config.yaml", cwd=setup)
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def worker(setup):
    results = setup / "worker"
    results.mkdir()
    result = torchrun(str(WORKER), "config.yaml", str(results), cwd=setup)
    assert result.returncode == 0, result.stdout[-3000:]
    return [json.loads((results / f"rank-{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, chat_tokenizer, make_tiny_llama):
    """The same training at bfloat16 compute: one process, DDP and FSDP2 (the worker's training alone)."""
    root = write_setup(tmp_path_factory.mktemp("distributed-bf16"), chat_tokenizer, make_tiny_llama, "bfloat16")
    run_one_process(load_config(root / "config.yaml", {"output_dir": str(root / "one")}))
    result = torchrun("-m", "fourbit", "train", "config.yaml", cwd=root)
    assert result.returncode == 0, result.stdout[-3000:]
    (root / "worker").mkdir()
    result = torchrun(str(WORKER), "config.yaml", str(root / "worker"), "--train-only", cwd=root)
    assert result.returncode == 0, result.stdout[-3000:]
    return root


def metrics(folder: Path, key: str) -> dict[int, float]:
    """step -> value, from the run's metrics.jsonl (a resumed run's holds only its own steps)."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def assert_same_run(folder: Path, reference: Path) -> None:
    for key in ("loss", "grad_norm", "eval_loss"):
        ours, theirs = metrics(folder, key), metrics(reference, key)
        assert ours, key
        assert ours == pytest.approx({step: theirs[step] for step in ours}, rel=1e-5), key
    ours, theirs = load_file(folder / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=ATOL, msg=key)


def test_ddp_equals_one_process_with_twice_the_accumulation(setup, one_process, ddp):
    assert ddp.count("trained 4 steps") == 1  # rank 0 alone reports
    assert "2 ranks, ddp" in ddp and "measured peak" in ddp and "(peak RSS of the process" in ddp
    # A loss that starts where the 4-bit model's does, not at zero (peers' packed-weight bug).
    assert one_process.losses[0] > 1
    assert_same_run(setup / "ddp", setup / "one")


@pytest.mark.parametrize("strategy_folder", ["ddp", "worker/fsdp"])
def test_at_bf16_compute_every_strategy_trains_the_same_adapter(bf16_runs, strategy_folder):
    one = load_file(bf16_runs / "one" / "adapter_model.safetensors")
    assert next(iter(one.values())).dtype == torch.float32  # the adapter itself stays float32
    assert_same_run(bf16_runs / strategy_folder, bf16_runs / "one")


def test_fsdp2_equals_one_process_with_twice_the_accumulation(setup, one_process, worker):
    assert_same_run(setup / "worker" / "fsdp", setup / "one")
    peft_keys = load_file(setup / "worker" / "fsdp" / "adapter_model.safetensors").keys()
    assert all(k.startswith("base_model.model.model.layers.") for k in peft_keys)  # one whole PEFT adapter


@pytest.mark.parametrize("saved_by", ["ddp", "worker/fsdp"])
def test_a_checkpoint_saved_by_two_ranks_resumes_on_one(setup, one_process, ddp, worker, saved_by):
    out = setup / f"resumed-{saved_by.replace('/', '-')}"
    resumed = run(load_config(setup / "config.yaml", {
        "output_dir": str(out), "resume_from_checkpoint": str(setup / saved_by / "checkpoint-2")}))
    assert resumed.losses[:2] == list(metrics(setup / saved_by, "loss").values())[:2]  # steps 1-2: the checkpoint's
    assert sorted(metrics(out, "loss")) == [3, 4]
    assert_same_run(out, setup / "one")


def test_ddp_evaluation_splits_the_set_and_gathers_every_answer(setup, worker, tmp_path):
    # 13 held-out conversations, 7 and 6 answered on the ranks: both score all 13, the same, and
    # in the order one process answers them (greedy on the untrained adapter, which adds exactly
    # zero; a lost, repeated or misplaced answer shows). The split itself: test_recipe.py.
    alone = run(load_config(setup / "config.yaml", {"eval_dataset": str(setup / "echo.json"), "max_steps": 1,
                                                    "output_dir": str(tmp_path / "eval")})).eval_before
    assert worker[0]["ddp_eval"]["total"] == worker[1]["ddp_eval"]["total"] == 13
    assert worker[0]["ddp_eval"]["answers"] == worker[1]["ddp_eval"]["answers"] == alone["answers"]
    assert len(set(alone["answers"])) > 1  # answers that tell the conversations apart


def test_bad_input_stops_every_rank_with_the_same_reason(worker):
    for report in worker:
        assert "global_batch_size 6 is not divisible by per_device_train_batch_size x world size = 2 x 2" in \
            report["indivisible_global_batch"]
        assert "different configs" in report["different_configs"]
        assert "optim 'adamw_8bit'" in report["fsdp_8bit_optimizer"] and "strategy fsdp" in report["fsdp_8bit_optimizer"]
        assert "nccl needs CUDA" in report["nccl_without_cuda"]
        assert "eval_dataset with strategy fsdp" in report["fsdp_eval"]
    assert worker[1]["one_rank_fails"] == "ValueError: rank 1's own check failed"
    assert worker[0]["one_rank_fails"].startswith("InputError: rank 1 refused the run, so every rank stops")


def test_a_step_takes_the_same_micro_batches_at_any_world_size():
    config = load_config(None, {"per_device_train_batch_size": 2, "global_batch_size": 8})
    assert micro_batches_per_step(config, Ranks(0, 2)) == micro_batches_per_step(config, Ranks()) == 4
    config = load_config(None, {"gradient_accumulation_steps": 3})
    assert micro_batches_per_step(config, Ranks(0, 2)) == 6  # without a global batch: ranks x accumulation
    step = [[0, 1], [2, 3], [4, 5]]
    assert shard(step, Ranks(0, 2)) == [([0, 1], 1.0), ([4, 5], 1.0)]
    assert shard(step, Ranks(1, 2)) == [([2, 3], 1.0), ([0, 1], 0.0)]  # a weight-0 repeat: equal backward counts
