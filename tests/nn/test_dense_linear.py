"""DenseLinear (nn/dense_linear.py): nn.Linear's function and parameters, its few-row products
without a gradient through the native kernel, everything else through nn.Linear itself; and
load_model's head on a CPU."""

import contextlib

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


def q8_linear(n: int = 40, k: int = 96) -> nn.Linear:
    """A float32 nn.Linear whose weight is int8 codes times a scale per 32 (as a Q8_0 tensor reads)."""
    codes = torch.randint(-127, 128, (n, k)).float()
    codes[:, ::32] = 127  # each block's largest code, as Q8_0 makes them
    scales = (torch.rand(n, k // 32) + 0.5).half().float()  # float16 scales, as Q8_0 stores them
    linear = nn.Linear(k, n).requires_grad_(False)
    linear.weight.copy_((codes.reshape(n, -1, 32) * scales[..., None]).reshape(n, k))
    return linear


def test_a_weight_of_8_bit_codes_is_read_as_them_with_the_same_result(kernels_on):
    torch.manual_seed(0)
    linear = q8_linear()
    layer = DenseLinear.from_linear(linear)
    x = torch.randn(3, 1, 96)

    def dense():  # the dense kernel on the weight as it is now (bit for bit what the layer must give)
        return native.matmul_dense(x, linear.weight, linear.bias)

    with torch.no_grad():
        expected = dense()
        with counting("matmul_q8") as q8, counting("matmul_dense") as plain:
            assert torch.equal(layer(x), expected)
        assert q8 == [(3, 1, 96)] and plain == []
        linear.weight[0, 0] += 1e-3  # in place, off the grid: the form is looked for again, and gone
        expected = dense()
        with counting("matmul_q8") as q8, counting("matmul_dense") as plain:
            assert torch.equal(layer(x), expected)
        assert q8 == [] and plain == [(3, 1, 96)]
        linear.weight.copy_(q8_linear().weight)  # back on a grid (another one): found again
        expected = dense()
        with counting("matmul_q8") as q8:
            assert torch.equal(layer(x), expected)
        assert q8 == [(3, 1, 96)]


@contextlib.contextmanager
def counting(name: str):
    """The shapes of x that reach native.``name`` inside the block."""
    calls, kernel = [], getattr(native, name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, name, lambda *a, **kw: calls.append(tuple(a[0].shape)) or kernel(*a, **kw))
        yield calls


def test_the_8_bit_form_is_float32_only_and_left_out_of_copies(kernels_on):
    import copy
    import pickle

    layer = DenseLinear.from_linear(q8_linear())
    half = DenseLinear.from_linear(q8_linear().bfloat16())
    with torch.no_grad(), counting("matmul_q8") as q8:
        layer(torch.randn(1, 96))
        assert "_q8" in layer.__dict__ and q8 == [(1, 96)]
        for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert "_q8" not in twin.__dict__
            assert torch.equal(twin(torch.ones(1, 96)), layer(torch.ones(1, 96)))  # found again on use
        q8.clear()
        half(torch.randn(1, 96).bfloat16())
    assert "_q8" not in half.__dict__ and q8 == []


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
