"""Non-reentrant gradient checkpointing with a frozen 4-bit base and frozen embeddings."""

import pytest
import torch

from fourbit import load_model
from fourbit.kernels.cpu import native as cpu_native
from fourbit.nn.lora import add_lora, lora_adapters
from fourbit.train.recipe import causal_lm_loss, enable_gradient_checkpointing


def lora_grads(folder, checkpointing: bool, rows: int = 2) -> tuple[dict[str, torch.Tensor], int]:
    model, _ = load_model(folder, compute_dtype="float32")
    torch.manual_seed(0)
    add_lora(model, r=4, alpha=8, verbose=False)
    with torch.no_grad():  # B = 0 at init would give A no gradient; make both sides live
        for adapter in lora_adapters(model).values():
            adapter.lora_B.weight.normal_(0, 0.02)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    calls = []
    # a pre-hook: non-reentrant recomputation stops early, once the saved tensors are rebuilt
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    ids = torch.randint(0, 256, (rows, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    causal_lm_loss(model, batch).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(calls)


def test_every_lora_parameter_gets_the_same_nonzero_gradient_with_and_without(tiny_llama):
    folder, _ = tiny_llama
    (plain, plain_calls), (checkpointed, checkpointed_calls) = lora_grads(folder, False), lora_grads(folder, True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # checkpointing really recomputes the layer in backward
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 14
    for name, grad in plain.items():
        assert checkpointed[name] is not None and grad.abs().sum() > 0, name
        # The recomputed forward repeats the same fp32 ops: equal up to summation order.
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


def count_calls(monkeypatch) -> list[str]:
    """What kernels/lora.py calls: "matmul" (forward), "grad" (dL/dx), "dequantize" (a dense W kept)."""
    from fourbit.kernels import lora as kernel

    calls = []
    for name, label in (("matmul_4bit", "matmul"), ("matmul_4bit_grad", "grad"), ("dequantize_4bit", "dequantize")):
        real = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, _real=real, _label=label, **k: calls.append(_label) or _real(*a, **k))
    return calls


def test_on_a_cpu_each_weight_is_dequantized_twice_a_step_not_three_times(tiny_llama, monkeypatch):
    # Under checkpointing a QLoRA layer keeps its recomputed forward's dequantized weight for dL/dx
    # (kernels/lora.py). Tiny Llama: 14 adapted 4-bit linears; without checkpointing layer 0's
    # q, k, v take no dL/dx (frozen embeddings below them); with it transformers makes the
    # embeddings' output require grad, and they do. 2 x 16 tokens: few enough rows that the
    # products dequantize into a dense W (more rows in float32 on AVX-512: the next test).
    calls = count_calls(monkeypatch)
    folder, _ = tiny_llama
    lora_grads(folder, checkpointing=False)
    # forward: a product each; backward: 11 products with W for dL/dx
    assert [calls.count(c) for c in ("matmul", "grad", "dequantize")] == [14, 11, 0]
    calls.clear()
    lora_grads(folder, checkpointing=True)
    # forward and recomputed forward: each of the 14 dequantized and kept (the first forward's
    # weight dropped by checkpointing), no product with the codes in backward: 28, where it was 14 x 3
    assert [calls.count(c) for c in ("matmul", "grad", "dequantize")] == [0, 0, 28]


def test_where_the_products_dequantize_inside_themselves_no_weight_is_kept(tiny_llama, monkeypatch):
    # float32 on a CPU with AVX-512, more than 32 rows: both products dequantize W inside
    # themselves (kernels/cpu/gemm_4bit.c), so a dense W kept for backward would save nothing:
    # under checkpointing each weight takes three products with its codes and none is kept.
    monkeypatch.setenv(cpu_native.ENV, "1")  # the native kernels, off for the suite (tests/conftest.py)
    if not cpu_native.supports_training(torch.zeros(48, 64), 64, 256, 64):
        pytest.skip("the products that dequantize inside themselves need float32 on an AVX-512 or AVX2 CPU")
    calls = count_calls(monkeypatch)
    folder, _ = tiny_llama
    plain, _ = lora_grads(folder, checkpointing=False, rows=3)
    assert [calls.count(c) for c in ("matmul", "grad", "dequantize")] == [14, 11, 0]
    calls.clear()
    checkpointed, _ = lora_grads(folder, checkpointing=True, rows=3)
    # 12 of the 14 (down_proj's rows of 160 are not whole 64-blocks: those 2 keep their dense W)
    assert [calls.count(c) for c in ("matmul", "grad", "dequantize")] == [12 * 2, 12, 2 * 2]
    for name, grad in plain.items():  # the recomputed forward repeats the same float32 sums
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)
