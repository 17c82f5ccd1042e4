"""Hidden checks of Chapter 7's exercises (scripts/assignments.py puts them in the autograder)."""

from collections import OrderedDict

from qlora_edu.paging import SimulatedDevice, simulate_steps


def _run(env, capacity, **device_args):
    device = SimulatedDevice(capacity, **device_args)
    simulate_steps(device, env["static"], env["states"], env["activations"])
    return device.stats


def ch7_ex_pagesize(env):
    """Each page size's faults and bytes, remeasured."""
    for page_size, stats in env["by_page"].items():
        again = _run(env, env["capacity"], page_size=page_size)
        assert (stats.faults, stats.bytes_to_device) == (again.faults, again.bytes_to_device)
    assert len(env["by_page"]) == 3


def ch7_ex_faults(env):
    """More faults than the shortfall in whole 2 MiB pages: the short last pages count too."""
    used = sum(env["static"].values()) + sum(env["states"].values())
    shortfall = used + env["activations"][4] - env["capacity"]
    assert env["predicted"] > shortfall // (2 * 2**20)


def ch7_ex_prefetch(env):
    """The time with prefetching, remeasured."""
    stats = _run(env, int(env["capacities"][0]))
    assert abs(env["transfer_seconds"]["with prefetch"] - stats.seconds) < 1e-12


def ch7_ex_evict(env):
    """Hand-made cases: nothing to evict, several pages, exactly full, and too much."""
    evict_for = env["evict_for"]
    pages = OrderedDict(a=3, b=5, c=2)
    assert evict_for(OrderedDict(pages), 10, 12, 1) == []
    assert evict_for(OrderedDict(pages), 10, 12, 6) == ["a", "b"]
    assert evict_for(OrderedDict(pages), 10, 12, 12) == ["a", "b", "c"]
    try:
        evict_for(OrderedDict(pages), 10, 12, 13)
    except MemoryError:
        return
    raise AssertionError("no MemoryError when even evicting every page is not enough")
