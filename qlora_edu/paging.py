# Written in notebooks/07_paged_optimizers.ipynb
# (the cells marked # @save). Edit the chapter and run `make save`, not this file.
"""Paged optimizers, simulated (Chapter 7).

bitsandbytes allocates paged optimizer state with CUDA unified memory: when the GPU runs out, the
driver evicts pages to CPU RAM and pages them back when they are touched; before each parameter's
update bitsandbytes prefetches its state. That needs a GPU. This module shows the same mechanism on
any machine with a *simulated* accelerator that accounts for every allocation in bytes:

- ``SimulatedDevice``: a fixed capacity, a page size, a host link (bandwidth, latency, and how
  much slower pages move when they fault in on demand than when they are prefetched). Ordinary
  allocations (weights, gradients, activations) stay put; paged allocations live in pages that are
  evicted least-recently-used first when something else needs the room, and paged back in when
  touched. It counts faults, bytes moved each way, transfer seconds and the peak bytes in use.
- ``PagedAdamW``: ``torch.optim.AdamW`` whose state is registered as paged allocations of that
  device and prefetched before each update. The arithmetic is AdamW's own, so the parameters stay
  bit-identical to ``torch.optim.AdamW``: paging changes where the state lives, not the result.
- ``Adam8bitState`` and ``adamw8bit_step``: AdamW with its two moments stored in 8 bits, blockwise
  against the dynamic maps of Chapter 4, as bitsandbytes' 8-bit optimizers store them (the
  ``paged_adamw_8bit`` that Chapter 9 trains with); bit-identical to ``bnb.optim.AdamW8bit`` on a
  CPU.
"""

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


class SimulatedOOM(RuntimeError):
    """The simulated device could not make room for an allocation."""


@dataclass
class TransferStats:
    faults: int = 0  # pages brought back to the device
    evictions: int = 0  # pages sent to the host
    bytes_to_device: int = 0
    bytes_to_host: int = 0
    seconds: float = 0.0  # simulated transfer time


class SimulatedDevice:
    """An accelerator's memory, simulated: capacity, pages, and a host link."""

    def __init__(
        self,
        capacity: int,
        page_size: int = 2 * 2**20,
        bandwidth: float = 25e9,
        latency: float = 10e-6,
        paging: bool = True,
        fault_slowdown: float = 3.0,
    ):
        if capacity <= 0 or page_size <= 0 or bandwidth <= 0 or latency < 0 or fault_slowdown < 1:
            raise ValueError(
                "capacity, page_size and bandwidth must be positive, latency non-negative and "
                f"fault_slowdown at least 1; got capacity={capacity}, page_size={page_size}, "
                f"bandwidth={bandwidth}, latency={latency}, fault_slowdown={fault_slowdown}"
            )
        self.capacity, self.page_size = capacity, page_size
        self.bandwidth, self.latency, self.paging = bandwidth, latency, paging
        self.fault_slowdown = fault_slowdown  # demand-faulted bytes move this much slower
        self.fixed: dict[str, int] = {}  # name -> bytes, never moved
        self.paged: dict[str, list[int]] = {}  # name -> size of each of its pages
        self.resident: OrderedDict[tuple[str, int], int] = OrderedDict()  # LRU first
        self.used = 0  # bytes on the device: fixed allocations plus resident pages
        self.stats = TransferStats()
        self.peak = 0

    def _check_size(self, name: str, nbytes: int) -> None:
        if nbytes <= 0:
            raise ValueError(f"allocation {name!r} must have a positive size, got {nbytes}")
        if nbytes > self.capacity:
            raise ValueError(
                f"allocation {name!r} of {nbytes:,} bytes can never fit a device of "
                f"{self.capacity:,} bytes"
            )

    def _transfer(self, nbytes: int, slowdown: float = 1.0) -> None:
        self.stats.seconds += self.latency + slowdown * nbytes / self.bandwidth

    def _make_room(self, nbytes: int, keep: str | None = None) -> None:
        """Evict least-recently-used pages (not those of ``keep``) until ``nbytes`` fit."""
        kept = []
        while self.capacity - self.used < nbytes and self.resident:
            key, size = self.resident.popitem(last=False)
            if key[0] == keep:
                kept.append((key, size))
                continue
            self.used -= size
            self.stats.evictions += 1
            self.stats.bytes_to_host += size
            self._transfer(size)
        for key, size in reversed(kept):  # back to their place at the old end of the order
            self.resident[key] = size
            self.resident.move_to_end(key, last=False)
        available = self.capacity - self.used
        if available < nbytes:
            raise SimulatedOOM(
                f"out of memory: {nbytes:,} bytes needed, {available:,} available "
                f"of {self.capacity:,} ({self.used:,} in use)"
            )

    def _record_peak(self) -> None:
        self.peak = max(self.peak, self.used)

    def allocate(self, name: str, nbytes: int) -> None:
        """An ordinary allocation (weights, gradients, activations): it never moves."""
        self._check_size(name, nbytes)
        self._make_room(nbytes)  # without paging nothing is resident-and-pageable: no eviction
        self.fixed[name] = nbytes
        self.used += nbytes
        self._record_peak()

    def allocate_paged(self, name: str, nbytes: int) -> None:
        """A paged allocation, created on the device. Without paging it is an ordinary one."""
        if not self.paging:
            return self.allocate(name, nbytes)
        self._check_size(name, nbytes)
        pages = [self.page_size] * (nbytes // self.page_size)
        if nbytes % self.page_size:
            pages.append(nbytes % self.page_size)
        self.paged[name] = pages
        self._make_room(nbytes, keep=name)
        for index, size in enumerate(pages):
            self.resident[(name, index)] = size
        self.used += nbytes
        self._record_peak()

    def touch(self, name: str, prefetch: bool = True) -> None:
        """Make all pages of ``name`` resident, paging in those on the host.

        With ``prefetch`` the missing pages come over in one transfer (one latency), as when
        bitsandbytes prefetches a parameter's state before its update; without it each page
        faults on its own, and moves ``fault_slowdown`` times slower.
        """
        if name not in self.paged:
            return
        missing = 0
        for index, size in enumerate(self.paged[name]):
            key = (name, index)
            if key in self.resident:
                self.resident.move_to_end(key)
                continue
            self._make_room(size, keep=name)
            self.resident[key] = size
            self.used += size
            self.stats.faults += 1
            self.stats.bytes_to_device += size
            missing += size
            if not prefetch:
                self._transfer(size, self.fault_slowdown)
        if prefetch and missing:
            self._transfer(missing)
        self._record_peak()

    def free(self, name: str) -> None:
        self.used -= self.fixed.pop(name, 0)
        for index in range(len(self.paged.pop(name, []))):
            self.used -= self.resident.pop((name, index), 0)


class PagedAdamW(torch.optim.AdamW):
    """AdamW whose state lives in paged allocations of a :class:`SimulatedDevice`.

    Each parameter's two float32 moments are registered as one paged allocation when the state is
    created, and touched (prefetched) just before the parameter's update. As in bitsandbytes, only
    the state of parameters with at least ``min_paged_numel`` elements is paged; smaller states
    are ordinary allocations. The update itself is ``torch.optim.AdamW``'s.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        device: SimulatedDevice,
        min_paged_numel: int = 100_000,
        **kwargs,
    ):
        super().__init__(params, foreach=False, **kwargs)
        self.device, self.min_paged_numel = device, min_paged_numel
        self.names: dict[int, str] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                name = self.names.setdefault(id(p), f"adamw state {len(self.names)}")
                if name not in self.device.fixed and name not in self.device.paged:
                    nbytes = 2 * p.numel() * 4  # exp_avg and exp_avg_sq in float32
                    if p.numel() >= self.min_paged_numel:
                        self.device.allocate_paged(name, nbytes)
                    else:
                        self.device.allocate(name, nbytes)
                self.device.touch(name)
        return super().step(closure)


def simulate_steps(
    device: SimulatedDevice,
    static: dict[str, int],
    states: dict[str, int],
    activations: list[int],
) -> tuple[list[dict], int | None]:
    """Replay a training run on ``device`` with sizes in bytes, no tensors needed.

    ``static`` (weights, adapters, gradients) is allocated once, ``states`` (the optimizer's, one
    per parameter) as paged allocations. Each step allocates its activations, frees them after the
    backward pass, then touches every state for the update. Returns one record per completed step
    (peak bytes in use, page faults, transfer seconds) and the index of the step that ran out of
    memory, or None.
    """
    for name, nbytes in static.items():
        device.allocate(name, nbytes)
    for name, nbytes in states.items():
        device.allocate_paged(name, nbytes)
    records = []
    for step, nbytes in enumerate(activations):
        device.peak, before = device.used, TransferStats(**vars(device.stats))
        try:
            device.allocate("activations", nbytes)
        except SimulatedOOM:
            return records, step
        device.free("activations")
        for name in states:
            device.touch(name)
        records.append(
            {
                "peak": device.peak,
                "faults": device.stats.faults - before.faults,
                "seconds": device.stats.seconds - before.seconds,
            }
        )
    return records, None


from qlora_edu.codebooks import create_dynamic_map  # noqa: E402 (imports of the chapter's last cell)
from qlora_edu.quantize import dequantize_blockwise, quantize_blockwise  # noqa: E402

SIGNED_MAP = create_dynamic_map(signed=True)  # the first moment: either sign
UNSIGNED_MAP = create_dynamic_map(signed=False)  # the second moment: never negative
STATE_BLOCKSIZE = 256  # bitsandbytes' blocksize for 8-bit optimizer state


@dataclass
class Adam8bitState:
    """AdamW's two moments of one parameter in 8 bits: codes and one float32 absmax per block."""

    m: torch.Tensor  # uint8 codes of the first moment, against SIGNED_MAP
    m_absmax: torch.Tensor
    v: torch.Tensor  # uint8 codes of the second moment, against UNSIGNED_MAP
    v_absmax: torch.Tensor
    step: int = 0

    @classmethod
    def zeros(cls, p: torch.Tensor) -> "Adam8bitState":
        blocks = -(-p.numel() // STATE_BLOCKSIZE)
        codes = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
        absmax = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        return cls(codes, absmax, codes.clone(), absmax.clone())

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.m, self.m_absmax, self.v, self.v_absmax)
        )


@torch.no_grad()
def adamw8bit_step(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: Adam8bitState,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> None:
    """One AdamW step of ``p`` with its moments in 8 bits: dequantize, update, quantize again.

    The arithmetic and the quantizer are those of bitsandbytes' 8-bit blockwise optimizers on a
    CPU (``bnb.optim.AdamW8bit``), so parameters and state come out bit-identical to them.
    """
    state.step += 1
    beta1, beta2 = betas
    m = dequantize_blockwise(state.m, state.m_absmax, SIGNED_MAP, STATE_BLOCKSIZE)
    v = dequantize_blockwise(state.v, state.v_absmax, UNSIGNED_MAP, STATE_BLOCKSIZE)
    g = grad.detach().float().reshape(-1)
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    correction1 = 1.0 - beta1**state.step
    correction2 = (1.0 - beta2**state.step) ** 0.5
    denom = (v.sqrt() / correction2).add_(eps)
    weights = p.detach().float().reshape(-1)
    if weight_decay > 0.0:
        weights.mul_(1.0 - lr * weight_decay)
    weights.addcdiv_(m, denom, value=-lr / correction1)
    p.data.copy_(weights.view(p.shape))
    state.m, state.m_absmax = quantize_blockwise(m, SIGNED_MAP, STATE_BLOCKSIZE, search="table")
    state.v, state.v_absmax = quantize_blockwise(v, UNSIGNED_MAP, STATE_BLOCKSIZE, search="table")
