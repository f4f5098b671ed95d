"""causal_lm_loss: the fused head path equals the model's own forward, and is taken only where
the model's logits are lm_head(h) and nothing more."""

import torch
from torch import nn

from fourbit import load_model
from fourbit.nn.lora import add_lora, lora_adapters
from fourbit.train import loss as loss_module
from fourbit.train.loss import causal_lm_loss, fused_head


def plain_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def qlora(folder):
    model, _ = load_model(folder, compute_dtype="float32")
    torch.manual_seed(0)
    add_lora(model, r=4, alpha=8, verbose=False)
    with torch.no_grad():  # B = 0 at init would give A no gradient
        for adapter in lora_adapters(model).values():
            adapter.lora_B.weight.normal_(0, 0.02)
    return model.train()


def test_fused_loss_and_gradients_equal_the_models_own_forward(tiny_llama):
    folder, _ = tiny_llama
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :6] = -100  # a prompt
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    fused_model, plain_model = qlora(folder), qlora(folder)
    assert fused_head(fused_model) is fused_model.lm_head
    fused, plain = causal_lm_loss(fused_model, batch), plain_loss(plain_model, batch)
    fused.backward()
    plain.backward()
    # fp32 throughout; the two differ in the order of the loss's sum and of the head's product (chunks)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in plain_model.named_parameters() if p.requires_grad}
    for name, p in fused_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_models_forward_runs_where_the_head_is_not_plain(tiny_llama, monkeypatch):
    folder, _ = tiny_llama
    model = qlora(folder)
    wrapper = nn.Module()  # what DDP looks like from here: not the model itself
    wrapper.module = model
    assert fused_head(wrapper) is None
    monkeypatch.setattr(model.config, "model_type", "gemma2")  # soft-caps its logits
    assert fused_head(model) is None
    monkeypatch.setattr(model.config, "model_type", "llama")
    model.lm_head.weight.requires_grad_(True)  # a head that trains
    assert fused_head(model) is None


def test_eval_under_no_grad_gives_the_same_loss(tiny_llama, monkeypatch):
    folder, _ = tiny_llama
    model = qlora(folder).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        fused = causal_lm_loss(model, batch)
        monkeypatch.setattr(loss_module, "fused_head", lambda model: None)
        plain = causal_lm_loss(model, batch)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
