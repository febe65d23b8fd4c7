"""The pager's building blocks: slot pools (one per tier) and the copy engines between host and
device memory. Nothing here knows layers or architectures: keys are opaque, slots are rows of
one byte tensor.

Copy engines:
- CudaCopies: pinned host memory (page-aligned AlignedBuffer registered with cudaHostRegister,
  so O_DIRECT reads land in it and DMA copies run asynchronously), one copy stream per
  direction, an event per copy; compute waits only on the events of the records it uses.
- HostCopies: the CPU twin (and any device without streams): plain synchronous copies, no
  events. The tiered pager runs the same logic on both, so CI tests the CUDA arrangement.
"""
from __future__ import annotations

import torch

from ..io import aligned_empty


class SlotPool:
    """Up to `capacity` records in slots, rows of one uint8 tensor (RAM, pinned RAM or VRAM); a
    map key -> slot; a replacement policy that picks victims. `spare` extra rows let a record
    come in while the one it swaps with is still on its way out. `fence[slot]` is the event of
    the last copy that reads or writes the slot (None when none is pending). `watch`, when set, is
    called as watch(key, slot) on every put and watch(key, None) on every removal (the device-side
    slot table follows tier 0 this way)."""

    def __init__(self, name: str, capacity: int, record_size: int, policy, storage: torch.Tensor, spare: int = 0):
        self.name, self.capacity, self.policy = name, capacity, policy
        rows = capacity + spare
        self.slots = storage[:rows * record_size].view(rows, record_size)
        self.slot_of: dict = {}
        self.key_of: list = [None] * rows
        self.free = list(range(rows - 1, -1, -1))
        self.fence: list = [None] * rows
        self.watch = None

    def __contains__(self, key) -> bool:
        return key in self.slot_of

    def __len__(self) -> int:
        return len(self.slot_of)

    def take(self, protected) -> tuple[int, object]:
        """A slot for a new record: a free one, else the policy's victim outside `protected`.
        Returns (slot, evicted key or None); the caller decides what becomes of the victim."""
        if self.free and len(self.slot_of) < self.capacity:
            return self.free.pop(), None
        key = self.policy.victim(protected)
        return self.pop(key), key

    def put(self, key, slot: int):
        self.slot_of[key] = slot
        self.key_of[slot] = key
        self.policy.insert(key)
        if self.watch is not None:
            self.watch(key, slot)

    def pop(self, key) -> int:
        """Remove a record (its slot is the caller's, not yet free)."""
        slot = self.slot_of.pop(key)
        self.policy.remove(key)
        self.key_of[slot] = None
        if self.watch is not None:
            self.watch(key, None)
        return slot

    def release(self, slot: int):
        self.free.append(slot)


class HostCopies:
    """Synchronous copies (CPU twin): every copy is complete when it returns."""

    def host_memory(self, nbytes: int, huge: bool = False) -> torch.Tensor:
        return aligned_empty(nbytes, huge=huge)

    def fence(self):
        return None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=()):
        dst.copy_(src)
        return None

    def use(self, event):
        pass

    def up_idle(self) -> bool:
        return True

    @staticmethod
    def wait(event):
        pass

    def close(self):
        pass


class CudaCopies:
    """Copies on two dedicated CUDA streams, host->device and device->host (the GPU has a copy
    engine for each direction, so a record going down overlaps one coming up), each followed by
    an event. Ordering between copies that touch the same slot is by events (`after`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.up, self.down = torch.cuda.Stream(device), torch.cuda.Stream(device)
        self._last_up = None  # the event of the last copy queued up (up_idle)
        self._registered: list = []

    def host_memory(self, nbytes: int, huge: bool = False) -> torch.Tensor:
        """Page-aligned host memory registered with CUDA (pinned): O_DIRECT reads and DMA copies
        (huge: in transparent huge pages, io.aligned_empty)."""
        t = aligned_empty(nbytes, huge=huge)
        if nbytes:
            err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise RuntimeError(f"cannot pin {nbytes} bytes of host memory for the expert tiers (cudaHostRegister "
                                   f"error {int(err)}): lower the RAM budget or raise the locked-memory limit")
            self._registered.append(t)
        return t

    def fence(self):
        """An event after everything already queued on the compute stream."""
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=()):
        """Queue dst <- src on the stream of its direction, after the events in `after`."""
        stream = self.up if dst.is_cuda else self.down
        with torch.cuda.stream(stream):
            for ev in after:
                if ev is not None:
                    stream.wait_event(ev)
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        if dst.is_cuda:
            self._last_up = ev
        return ev

    def up_idle(self) -> bool:
        """Whether every copy up queued so far is done (the host->device copy engine is idle)."""
        return self._last_up is None or self._last_up.query()

    def use(self, event):
        """The compute stream waits for a copy (the host does not)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    @staticmethod
    def wait(event):
        """The host waits for a copy (before it reuses the copy's host memory)."""
        if event is not None:
            event.synchronize()

    def close(self):
        self.up.synchronize()
        self.down.synchronize()
        # unpin: freed memory still registered makes a later cudaHostRegister of the same
        # addresses fail ("already registered"), and leaves that error pending for the next call
        for t in self._registered:
            torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
        self._registered.clear()
        for t in self._registered:
            torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
        self._registered = []


def event_times(fn, reps: int) -> list[float]:
    """Seconds of each of `reps` calls of fn() on the current CUDA stream, CUDA events around each."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return times
