"""Non-reentrant gradient checkpointing with a frozen 4-bit base and frozen embeddings."""

import torch

from fourbit import load_model
from fourbit.nn.lora import add_lora, lora_adapters
from fourbit.train.recipe import causal_lm_loss, enable_gradient_checkpointing


def lora_grads(folder, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
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
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
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


def test_on_a_cpu_each_weight_is_dequantized_twice_a_step_not_three_times(tiny_llama, monkeypatch):
    # Under checkpointing a QLoRA layer keeps its recomputed forward's dequantized weight for dL/dx
    # (kernels/lora.py). Tiny Llama: 14 adapted 4-bit linears; without checkpointing layer 0's
    # q, k, v take no dL/dx (frozen embeddings below them); with it transformers makes the
    # embeddings' output require grad, and they do.
    from fourbit.kernels import lora as kernel

    calls = []
    real_dequantize, real_matmul = kernel.dequantize_4bit, kernel.matmul_4bit
    monkeypatch.setattr(kernel, "dequantize_4bit", lambda *a, **k: calls.append("dequantize") or real_dequantize(*a, **k))
    monkeypatch.setattr(kernel, "matmul_4bit", lambda *a, **k: calls.append("matmul") or real_matmul(*a, **k))
    folder, _ = tiny_llama
    lora_grads(folder, checkpointing=False)
    # forward: a product each (matmul_4bit dequantizes inside); backward: 11 dequantized again
    assert (calls.count("matmul"), calls.count("dequantize")) == (14, 11)
    calls.clear()
    lora_grads(folder, checkpointing=True)
    # forward and recomputed forward: each of the 14 dequantized and kept (the first forward's
    # weight dropped by checkpointing), nothing dequantized in backward: 28, where it was 14 x 3
    assert (calls.count("matmul"), calls.count("dequantize")) == (0, 28)
