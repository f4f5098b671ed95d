"""fourbit.optim.AdamW (32-bit state) against torch.optim.AdamW; arguments, skips, resume, names."""

import io

import pytest
import torch

from fourbit.optim import OPTIMIZERS, AdamW, build_optimizer

# One below min_8bit_size (4096), one 8-bit sized, one at least page_min_numel (1e5) elements.
SHAPES = [(10, 10), (64, 128), (320, 320)]


def make_params(shapes=SHAPES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params, step, seed=1):
    """Gradients that depend only on (step, seed), so any two runs see the same sequence."""
    generator = torch.Generator().manual_seed(seed * 100_003 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def run(optimizer, params, steps, start=0):
    for step in range(start, start + steps):
        set_grads(params, step)
        optimizer.step()


def test_32bit_equals_torch_single_tensor_adamw_bit_for_bit():
    # Tolerance 0: AdamW runs torch's single-tensor ops in torch's order on float32, and that
    # is the path torch.optim.AdamW takes for CPU tensors (foreach=False made explicit here).
    ours, theirs = make_params(), make_params()
    mine = AdamW(ours, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    reference = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, foreach=False)
    run(mine, ours, 50)
    run(reference, theirs, 50)
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        assert torch.equal(mine.state[p]["exp_avg"], reference.state[q]["exp_avg"])
        assert torch.equal(mine.state[p]["exp_avg_sq"], reference.state[q]["exp_avg_sq"])
        assert mine.state[p]["step"] == 50


def test_32bit_tracks_torch_fused_adamw_to_float_rounding():
    # torch's fused kernel evaluates the same formulas with other roundings (it fuses the
    # multiply-adds): each step may differ by a few float32 ulps of the update and of p, and
    # with gradients that do not depend on p these do not grow, they add. |p| < 6 here, so an
    # ulp of p is <= 2**-21 ~ 4.8e-7; allow 2 ulps per step over 50 steps: 50 * 2 * 4.8e-7.
    ours, theirs = make_params(), make_params()
    mine = AdamW(ours, lr=1e-2, weight_decay=0.1)
    reference = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, fused=True)
    run(mine, ours, 50)
    run(reference, theirs, 50)
    for p, q in zip(ours, theirs):
        assert p.abs().max() < 6
        torch.testing.assert_close(p, q, rtol=0, atol=50 * 2 * 2**-21)


def test_param_groups_keep_their_own_hyperparameters():
    ours, theirs = make_params(SHAPES[:2]), make_params(SHAPES[:2])
    groups = lambda ps: [{"params": [ps[0]], "lr": 3e-2, "weight_decay": 0.0}, {"params": [ps[1]]}]  # noqa: E731
    mine = AdamW(groups(ours), lr=1e-3, weight_decay=0.05)
    reference = torch.optim.AdamW(groups(theirs), lr=1e-3, weight_decay=0.05, foreach=False)
    run(mine, ours, 5)
    run(reference, theirs, 5)
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


def test_half_precision_params_get_float32_state_and_float32_math():
    # The update runs in float32 on p.float() and rounds to bf16 once, so it equals a float32
    # AdamW step from the same bf16 start rounded to bf16 (tolerance 0 for one step).
    start = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).bfloat16()
    p = torch.nn.Parameter(start.clone())
    q = torch.nn.Parameter(start.float())
    mine, reference = AdamW([p], lr=1e-2), torch.optim.AdamW([q], lr=1e-2, foreach=False)
    grad = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    p.grad, q.grad = grad.bfloat16(), grad.bfloat16().float()
    mine.step()
    reference.step()
    assert p.dtype == torch.bfloat16 and mine.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(p, q.bfloat16())


def test_frozen_params_and_params_without_grad_are_skipped():
    frozen, no_grad, live = make_params(SHAPES[:1] * 3)
    frozen.requires_grad_(False)
    frozen.grad = torch.ones_like(frozen)  # a stale grad on a frozen param is ignored too
    before = [frozen.detach().clone(), no_grad.detach().clone()]
    optimizer = AdamW([frozen, no_grad, live], weight_decay=0.1)
    live.grad = torch.ones_like(live)
    optimizer.step()
    assert torch.equal(frozen, before[0]) and torch.equal(no_grad, before[1])
    assert frozen not in optimizer.state and no_grad not in optimizer.state
    assert optimizer.state[live]["step"] == 1


def test_sparse_gradients_are_refused():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        AdamW(embedding.parameters()).step()


def test_closure_is_called_and_its_loss_returned():
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = AdamW([p])

    def closure():
        optimizer.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert optimizer.step(closure).item() == 3.0
    assert (p < 1).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1e-3), r"lr: learning rate must be >= 0"),
        (dict(lr=float("nan")), r"lr: learning rate must be >= 0"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\] must be in \[0, 1\)"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\] must be in \[0, 1\)"),
        (dict(betas=(0.9,)), r"betas must be a pair"),
        (dict(eps=-1e-8), r"eps must be >= 0"),
        (dict(weight_decay=-0.1), r"weight_decay must be >= 0"),
        (dict(optim_bits=16), r"optim_bits must be one of \(8, 32\)"),
        (dict(blocksize=100), r"blocksize must be one of \(32, 64, .*4096\)"),
        (dict(min_8bit_size=-1), r"min_8bit_size must be an int >= 0"),
        (dict(paged=1), r"paged must be True or False"),
        (dict(paged=True, page_min_numel=-5), r"page_min_numel must be an int >= 0"),
        (dict(page_min_numel=1.5), r"page_min_numel must be an int >= 0"),
        (dict(lr=torch.tensor(1e-3)), r"lr: learning rate must be a Python number"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdamW(make_params(SHAPES[:1]), **kwargs)


def test_a_learning_rate_of_zero_is_allowed_and_leaves_the_weights_alone():
    # Schedules start (warm-up) and end (cosine, linear) at 0: a state saved there must load and
    # step. With lr 0 (and no weight decay) AdamW's update is 0 x its direction: no change at all.
    params = make_params(SHAPES[:1])
    before = [p.detach().clone() for p in params]
    optimizer = AdamW(params, lr=0.0)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    AdamW(make_params(SHAPES[:1]), lr=1e-3).load_state_dict(optimizer.state_dict())


def test_bad_values_in_a_param_group_are_refused_too():
    first, second = make_params(SHAPES[:1] * 2)
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\)"):
        AdamW([{"params": [first]}, {"params": [second], "betas": (0.9, 1.5)}])


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_resume_from_state_dict_is_bit_identical(optim_bits):
    straight = make_params()
    optimizer = AdamW(straight, lr=1e-2, optim_bits=optim_bits)
    run(optimizer, straight, 10)

    first_half = make_params()
    optimizer = AdamW(first_half, lr=1e-2, optim_bits=optim_bits)
    run(optimizer, first_half, 5)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)

    resumed = clone_params(first_half)
    fresh = AdamW(resumed, lr=5.0, optim_bits=optim_bits)  # lr comes back from the checkpoint
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.param_groups[0]["lr"] == 1e-2
    for p, q in zip(first_half, resumed):
        for key, value in optimizer.state[p].items():
            loaded = fresh.state[q][key]
            if isinstance(value, torch.Tensor):
                assert loaded.dtype == value.dtype and loaded.device == value.device and torch.equal(loaded, value)
            else:
                assert loaded == value
    run(fresh, resumed, 5, start=5)
    assert all(torch.equal(p, q) for p, q in zip(straight, resumed))


def test_loaded_state_is_a_copy_not_the_checkpoint_tensors():
    # 32-bit state is updated in place, so a loaded state aliasing the checkpoint would change it.
    params = make_params(SHAPES[:2])
    optimizer = AdamW(params)
    run(optimizer, params, 2)
    saved = optimizer.state_dict()
    snapshot = saved["state"][1]["exp_avg"].clone()
    resumed = clone_params(params)
    fresh = AdamW(resumed)
    fresh.load_state_dict(saved)
    run(fresh, resumed, 1, start=2)
    assert torch.equal(saved["state"][1]["exp_avg"], snapshot)
    assert not torch.equal(fresh.state[resumed[1]]["exp_avg"], snapshot)


def test_a_torch_adamw_checkpoint_loads_and_continues_identically():
    straight = make_params()
    reference = torch.optim.AdamW(straight, lr=1e-2, foreach=False)
    run(reference, straight, 6)

    first_half = make_params()
    torch_optimizer = torch.optim.AdamW(first_half, lr=1e-2, foreach=False)
    run(torch_optimizer, first_half, 3)
    resumed = clone_params(first_half)
    mine = AdamW(resumed, lr=1e-2)
    mine.load_state_dict(torch_optimizer.state_dict())  # step is a tensor there
    assert mine.state[resumed[0]]["step"] == 3
    run(mine, resumed, 3, start=3)
    assert all(torch.equal(p, q) for p, q in zip(straight, resumed))


def test_build_optimizer_maps_the_ecosystem_names():
    assert OPTIMIZERS == ("adamw", "adamw_torch", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")
    expected = {
        "adamw": (32, False), "adamw_torch": (32, False), "adamw_8bit": (8, False),
        "paged_adamw_32bit": (32, True), "paged_adamw_8bit": (8, True),
    }
    for name, (bits, paged) in expected.items():
        optimizer = build_optimizer(name, make_params(SHAPES[:1]), lr=2e-4, weight_decay=0.01, betas=(0.9, 0.95), eps=1e-6)
        assert isinstance(optimizer, AdamW)
        group = optimizer.param_groups[0]
        assert (group["optim_bits"], optimizer.paged) == (bits, paged)
        assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (2e-4, 0.01, (0.9, 0.95), 1e-6)
    assert build_optimizer("adamw", make_params(SHAPES[:1]), lr=1e-3).param_groups[0]["weight_decay"] == 0.0


def test_build_optimizer_refuses_unknown_names_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown optimizer 'sgd'.*adamw.*paged_adamw_8bit"):
        build_optimizer("sgd", make_params(SHAPES[:1]), lr=1e-3)


def test_a_checkpoint_for_other_shapes_or_amsgrad_is_refused_and_changes_nothing():
    params = make_params(SHAPES[:2])
    optimizer = AdamW(params, lr=1e-2)
    run(optimizer, params, 1)
    saved = optimizer.state_dict()
    other = make_params([(64, 128), (10, 10)])  # same count, swapped shapes
    fresh = AdamW(other, lr=3e-3)
    with pytest.raises(ValueError, match=r"does not fit its parameter of shape \(64, 128\)"):
        fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] == 3e-3 and not fresh.state
    amsgrad = torch.optim.AdamW(clone_params(params), amsgrad=True).state_dict()
    with pytest.raises(ValueError, match="amsgrad=True"):
        AdamW(clone_params(params)).load_state_dict(amsgrad)
