"""Chapter 7: the simulated device and PagedAdamW."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_edu.paging import PagedAdamW, SimulatedDevice, SimulatedOOM, simulate_steps

MB = 2**20


def run(optimizer_cls, shapes, steps, seed, **kwargs):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    optimizer = optimizer_cls(params, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
    return params


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.sampled_from([(3,), (64, 32), (400, 300), (1000,)]), min_size=1, max_size=4),
    steps=st.integers(1, 6),
    lr=st.sampled_from([1e-3, 3e-2]),
    weight_decay=st.sampled_from([0.0, 0.01]),
    betas=st.sampled_from([(0.9, 0.999), (0.8, 0.95)]),
    capacity=st.sampled_from([2 * MB, 64 * MB]),
    seed=st.integers(0, 1000),
)
def test_paged_adamw_is_bit_identical_to_adamw(
    shapes, steps, lr, weight_decay, betas, capacity, seed
):
    hyper = dict(lr=lr, weight_decay=weight_decay, betas=betas)
    reference = run(torch.optim.AdamW, shapes, steps, seed, **hyper)
    device = SimulatedDevice(capacity, page_size=64 * 1024)
    device.allocate("activations", capacity // 2)  # squeeze the state so that it pages
    paged = run(PagedAdamW, shapes, steps, seed, device=device, min_paged_numel=1000, **hyper)
    for a, b in zip(reference, paged, strict=True):
        assert torch.equal(a, b)


def test_lru_eviction_and_prefetch_accounting():
    device = SimulatedDevice(10 * MB, page_size=1 * MB, bandwidth=1e9, latency=1e-3)
    device.allocate_paged("a", 4 * MB)
    device.allocate_paged("b", 4 * MB)
    device.touch("a")  # a becomes most recently used
    device.allocate("activations", 5 * MB)  # needs 3 MB more than free: evicts b's pages first
    assert device.stats.evictions == 3 and device.stats.bytes_to_host == 3 * MB
    assert not any(("b", i) in device.resident for i in range(3))  # least recently used went
    assert ("b", 3) in device.resident and ("a", 0) in device.resident
    device.free("activations")
    seconds = device.stats.seconds
    device.touch("b")  # prefetch: 3 pages in one transfer
    assert device.stats.faults == 3 and device.stats.bytes_to_device == 3 * MB
    assert device.stats.seconds - seconds == pytest.approx(1e-3 + 3 * MB / 1e9)
    assert device.peak == 10 * MB


def test_demand_faults_pay_a_latency_each_and_move_slower_than_a_prefetch():
    seconds = {}
    for prefetch in (True, False):
        device = SimulatedDevice(8 * MB, page_size=MB, bandwidth=1e9, latency=1e-3)
        device.allocate_paged("state", 4 * MB)
        device.allocate("activations", 8 * MB)  # every page of the state goes to the host
        device.free("activations")
        before = device.stats.seconds
        device.touch("state", prefetch=prefetch)
        seconds[prefetch] = device.stats.seconds - before
    assert seconds[True] == pytest.approx(1e-3 + 4 * MB / 1e9)
    assert seconds[False] == pytest.approx(4 * (1e-3 + 3.0 * MB / 1e9))  # fault_slowdown=3


def test_without_paging_a_spike_is_an_oom_that_names_the_bytes():
    device = SimulatedDevice(10 * MB, paging=False)
    device.allocate("weights", 4 * MB)
    device.allocate_paged("optimizer state", 4 * MB)
    with pytest.raises(SimulatedOOM, match=r"3,145,728 bytes needed, 2,097,152 available"):
        device.allocate("activations", 3 * MB)
    paged = SimulatedDevice(10 * MB)
    paged.allocate("weights", 4 * MB)
    paged.allocate_paged("optimizer state", 4 * MB)
    paged.allocate("activations", 3 * MB)  # fits: a page of state goes to the host
    assert paged.stats.evictions == 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(capacity=0), "capacity=0"),
        (dict(capacity=MB, page_size=0), "page_size=0"),
        (dict(capacity=MB, bandwidth=-1.0), "bandwidth=-1.0"),
        (dict(capacity=MB, latency=-1.0), "latency=-1.0"),
        (dict(capacity=MB, fault_slowdown=0.5), "fault_slowdown=0.5"),
    ],
)
def test_bad_device_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimulatedDevice(**kwargs)


def test_bad_allocations_are_named():
    device = SimulatedDevice(MB)
    with pytest.raises(ValueError, match="positive size"):
        device.allocate("x", 0)
    with pytest.raises(ValueError, match="can never fit a device of 1,048,576 bytes"):
        device.allocate_paged("huge", 2 * MB)


def test_a_spike_kills_the_unpaged_run_and_the_paged_run_survives():
    static = {"weights": 6 * MB, "adapters": 1 * MB}
    states = {f"state {i}": 1 * MB for i in range(3)}
    trace = [1 * MB, 1 * MB, 4 * MB, 1 * MB]
    plain = SimulatedDevice(12 * MB, page_size=256 * 1024, paging=False)
    records, oom = simulate_steps(plain, static, states, trace)
    assert oom == 2 and len(records) == 2
    paged = SimulatedDevice(12 * MB, page_size=256 * 1024)
    records, oom = simulate_steps(paged, static, states, trace)
    assert oom is None and len(records) == 4
    assert [r["faults"] for r in records] == [
        0,
        0,
        8,
        0,
    ]  # 2 MB of state paged back after the spike
    assert max(r["peak"] for r in records) == 12 * MB


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(16, 90),
    cols=st.integers(256, 700),
    lr=st.sampled_from([1e-4, 1e-3, 1e-2]),
    weight_decay=st.sampled_from([0.0, 1e-2, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_adamw8bit_step_is_bitsandbytes_adamw8bit(rows, cols, lr, weight_decay, seed):
    """Chapter 7's 8-bit AdamW: weights, codes and absmax bit-identical to bnb's on a CPU."""
    import bitsandbytes as bnb

    from qlora_edu.paging import Adam8bitState, adamw8bit_step

    g = torch.Generator().manual_seed(seed)
    start = torch.randn(rows, cols, generator=g) * 0.02
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    reference = bnb.optim.AdamW8bit([theirs], lr=lr, weight_decay=weight_decay, betas=(0.8, 0.99))
    state = Adam8bitState.zeros(ours)
    for _ in range(3):
        grad = torch.randn(rows, cols, generator=g) * 10 ** float(
            torch.randint(-4, 1, (1,), generator=g)
        )
        theirs.grad = grad.clone()
        reference.step()
        adamw8bit_step(ours, grad, state, lr=lr, betas=(0.8, 0.99), weight_decay=weight_decay)
    expected = reference.state[theirs]
    assert torch.equal(ours, theirs)
    assert torch.equal(state.m, expected["state1"].flatten())
    assert torch.equal(state.v, expected["state2"].flatten())
    assert torch.equal(state.m_absmax, expected["absmax1"])
    assert torch.equal(state.v_absmax, expected["absmax2"])
    assert state.nbytes() == 2 * ours.numel() + 8 * expected["absmax1"].numel()
