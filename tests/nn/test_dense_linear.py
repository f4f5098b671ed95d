"""DenseLinear (nn/dense_linear.py): nn.Linear's function and parameters, its few-row products
without a gradient through the native kernel, everything else through nn.Linear itself; and
load_model's head on a CPU."""

import pytest
import torch
from torch import nn

from fourbit.kernels.cpu import native
from fourbit.nn import DenseLinear


@pytest.fixture
def kernels_on(monkeypatch):
    monkeypatch.setenv(native.ENV, "1")  # the suite turns the compiled kernels off (tests/conftest.py)
    # as in tests/kernels/test_cpu_native.py: a machine that cannot build the kernel fails here, loudly
    assert native.library() is not None, "the native CPU kernel could not be built (is a C compiler installed?)"


@pytest.fixture
def counted(monkeypatch):
    calls = []
    kernel = native.matmul_dense
    monkeypatch.setattr(native, "matmul_dense", lambda *a, **kw: calls.append(a[0].shape) or kernel(*a, **kw))
    return calls


def test_it_holds_the_linears_own_parameters():
    linear = nn.Linear(12, 5)
    layer = DenseLinear.from_linear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert list(layer.state_dict()) == ["weight", "bias"] and isinstance(layer, nn.Linear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_goes_to_the_kernel_and_training_to_nn_linear(kernels_on, counted, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(100, 37).to(dtype).requires_grad_(False)
    layer = DenseLinear.from_linear(linear)
    x = torch.randn(2, 1, 100).to(dtype)
    with torch.no_grad():
        y = layer(x)
    assert counted == [(2, 1, 100)]
    expected = x.double() @ linear.weight.double().T + linear.bias.double()
    # float32 sums: ~1e-7 relative (bound 1e-5); a bf16 output is rounded to 2^-9 (bound 4e-3)
    assert y.dtype == dtype and rel(y, expected) < (1e-5 if dtype == torch.float32 else 4e-3)
    counted.clear()
    long = torch.randn(native.MAX_ROWS_DENSE + 1, 100).to(dtype)
    with torch.no_grad():
        assert torch.equal(layer(long), linear(long))  # past the kernel's rows: nn.Linear itself
    x.requires_grad_(True)
    assert torch.equal(layer(x), linear(x))  # dL/dx wanted: nn.Linear itself, with its autograd
    assert counted == []


def test_off_the_kernel_it_is_nn_linear(monkeypatch, counted):
    monkeypatch.setenv(native.ENV, "0")
    linear = nn.Linear(64, 16)
    x = torch.randn(1, 64)
    with torch.no_grad():
        assert torch.equal(DenseLinear.from_linear(linear)(x), linear(x))
    assert counted == []


def test_load_model_gives_the_head_on_a_cpu_tied_as_it_was(tiny_llama, kernels_on, counted):
    import fourbit
    from fourbit.train.loss import fused_head

    folder, _ = tiny_llama
    model, _ = fourbit.load_model(folder, compute_dtype="float32")
    head = model.get_output_embeddings()
    assert type(head) is DenseLinear
    model.requires_grad_(False)  # as add_lora leaves the base: then training fuses the head into the loss
    assert fused_head(model) is head
    tied = model.config.tie_word_embeddings
    assert (head.weight is model.get_input_embeddings().weight) == tied
    ids = torch.tensor([[1, 17, 42]])
    with torch.no_grad():
        logits = model(input_ids=ids, logits_to_keep=1).logits
        hidden = model.model(input_ids=ids).last_hidden_state[:, -1:]
    assert counted, "the head's one-row product did not reach the kernel"
    assert rel(logits, hidden.double() @ head.weight.double().T) < 1e-5  # float32 sums, as above


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
