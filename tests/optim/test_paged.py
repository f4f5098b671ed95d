"""Paged optimizer state: the Pager, paged == unpaged bit for bit, placement, exact resume."""

import io
import weakref

import pytest
import torch

from fourbit.optim import PAGE_MIN_NUMEL, AdamW, Pager

SHAPES = [(10, 10), (64, 128), (320, 320)]  # only the last (102400 elements) reaches 1e5


@pytest.fixture
def pinned(monkeypatch):
    """``pinned(t)``: whether ``t`` is a host buffer made pinned (page-locked).

    Host buffers are pinned exactly when CUDA exists. Without CUDA nothing can be pinned and the
    parameters' device is the host, so a paged buffer and a plain device tensor would look alike:
    there CUDA is made to look available, and the buffers created with ``pin_memory=True`` are
    made as plain CPU tensors and remembered, so a tensor the pager did not place still shows."""
    if torch.cuda.is_available():
        return lambda t: t.is_pinned()
    made, empty = {}, torch.empty

    def empty_remembering_pinned(*args, pin_memory=False, **kwargs):
        t = empty(*args, **kwargs)
        if pin_memory:
            made[id(t)] = weakref.ref(t)
        return t

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "empty", empty_remembering_pinned)
    return lambda t: (ref := made.get(id(t))) is not None and ref() is t


def make_params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def run(optimizer, params, steps, start=0):
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(7 * 100_003 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


def spy_on_fetch(optimizer):
    """Record, per update, which state keys the pager handed out as copies."""
    copied = []
    fetch = optimizer.pager.fetch

    def recording_fetch(state, device):
        working = fetch(state, device)
        copied.append({key for key, value in working.items() if value is not state[key]})
        return working

    optimizer.pager.fetch = recording_fetch
    return copied


def test_pager_pages_by_size_and_copies_both_ways(pinned):
    pager = Pager(min_numel=1000)
    big, small = torch.arange(1000.0), torch.arange(999.0)
    assert PAGE_MIN_NUMEL == 100_000 and pager.pages(big) and not pager.pages(small)
    host = pager.place(big, torch.device("cpu"))
    assert host.device.type == "cpu" and pinned(host)
    assert host.data_ptr() != big.data_ptr() and torch.equal(host, big)
    kept = pager.place(small, torch.device("cpu"))
    assert kept.data_ptr() == small.data_ptr() and not pinned(kept)  # already where it belongs

    state = {"step": 3, "big": host, "small": small}
    working = pager.fetch(state, torch.device("cpu"))
    assert working["step"] == 3 and working["small"] is small
    assert working["big"].data_ptr() != host.data_ptr() and torch.equal(working["big"], host)
    working["big"].add_(1)  # an update works on the device copy...
    assert torch.equal(host, big)
    replacement = torch.zeros(999)
    pager.store(state, {**working, "small": replacement})
    assert state["big"] is host and torch.equal(host, big + 1)  # ...and store writes it back in place
    assert state["small"] is replacement


def test_pager_refuses_a_paged_buffer_changing_shape():
    pager = Pager(min_numel=10)
    state = {"m": pager.place(torch.zeros(20), torch.device("cpu"))}
    with pytest.raises(ValueError, match="paged buffer keeps its shape"):
        pager.store(state, {"m": torch.zeros(21)})


def test_pager_without_threshold_pages_nothing():
    pager = Pager(min_numel=None)
    big = torch.zeros(10**6)
    assert not pager.pages(big) and pager.fetch({"m": big}, torch.device("cpu"))["m"] is big


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_paged_equals_unpaged_bit_for_bit(optim_bits):
    unpaged_params, paged_params, small_pages = make_params(), make_params(), make_params()
    unpaged = AdamW(unpaged_params, lr=1e-2, weight_decay=0.1, optim_bits=optim_bits)
    paged = AdamW(paged_params, lr=1e-2, weight_decay=0.1, optim_bits=optim_bits, paged=True)
    # page_min_numel=100 pages the 8192-element states too (and 8-bit absmax of 400 blocks)
    everything = AdamW(small_pages, lr=1e-2, weight_decay=0.1, optim_bits=optim_bits, paged=True, page_min_numel=100)
    for optimizer, params in ((unpaged, unpaged_params), (paged, paged_params), (everything, small_pages)):
        run(optimizer, params, 5)
    for p, q, r in zip(unpaged_params, paged_params, small_pages):
        assert torch.equal(p, q) and torch.equal(p, r)
        for key, value in unpaged.state[p].items():
            assert torch.equal(paged.state[q][key], value) if isinstance(value, torch.Tensor) else paged.state[q][key] == value


@pytest.mark.parametrize(
    "optim_bits, paged_keys",
    [(32, {"exp_avg", "exp_avg_sq"}), (8, {"exp_avg_codes", "exp_avg_sq_codes"})],
)
def test_only_state_tensors_of_1e5_elements_are_paged(optim_bits, paged_keys, pinned):
    params = make_params()
    optimizer = AdamW(params, optim_bits=optim_bits, paged=True)
    copied = spy_on_fetch(optimizer)
    run(optimizer, params, 2)
    # Updates run in parameter order: (10,10), (64,128), (320,320), twice. Only the large
    # parameter's m/v (or their 102400 codes) go through a host copy; its 400 absmax, the
    # 8192-element states and the 100-element ones stay on the device and are used in place.
    assert copied == [set(), set(), paged_keys] * 2
    big = optimizer.state[params[2]]
    for key in paged_keys:
        assert big[key].device.type == "cpu" and pinned(big[key])
        assert optimizer.pager.pages(big[key])
    others = [v for p in params for key, v in optimizer.state[p].items()
              if isinstance(v, torch.Tensor) and not (p is params[2] and key in paged_keys)]
    assert others and not any(optimizer.pager.pages(v) or pinned(v) for v in others)  # device tensors, used as is


def test_paged_host_buffers_are_written_in_place_across_steps():
    params = make_params()
    optimizer = AdamW(params, paged=True)
    run(optimizer, params, 1)
    buffer = optimizer.state[params[2]]["exp_avg"]
    address, before = buffer.data_ptr(), buffer.clone()
    run(optimizer, params, 1, start=1)
    assert optimizer.state[params[2]]["exp_avg"] is buffer and buffer.data_ptr() == address
    assert not torch.equal(buffer, before)


@pytest.mark.parametrize("optim_bits", [32, 8])
@pytest.mark.parametrize("resume_paged", [True, False])
def test_paged_resume_from_state_dict_is_bit_identical(optim_bits, resume_paged, pinned):
    straight = make_params()
    optimizer = AdamW(straight, lr=1e-2, optim_bits=optim_bits, paged=True)
    run(optimizer, straight, 10)

    first_half = make_params()
    optimizer = AdamW(first_half, lr=1e-2, optim_bits=optim_bits, paged=True)
    run(optimizer, first_half, 5)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)

    resumed = clone_params(first_half)
    # Paging is where the state lives, not what it is: a paged checkpoint resumes unpaged too.
    fresh = AdamW(resumed, lr=1e-2, optim_bits=optim_bits, paged=resume_paged)
    fresh.load_state_dict(torch.load(buffer))
    for p in resumed:
        for value in fresh.state[p].values():
            if isinstance(value, torch.Tensor):
                paged = resume_paged and value.numel() >= PAGE_MIN_NUMEL
                assert value.device == p.device and pinned(value) == paged
    copied = spy_on_fetch(fresh)
    run(fresh, resumed, 5, start=5)
    assert all(torch.equal(p, q) for p, q in zip(straight, resumed))
    assert any(copied) == resume_paged
