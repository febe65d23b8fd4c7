"""The expert pager, CPU tier: a pool of record-sized slots holding at most `budget` bytes,
filled from the store by the native reader threads and emptied by a replacement policy.
It sees layers, expert ids and byte ranges; never architectures."""
from __future__ import annotations

import time

import torch

from ..plugins import registry
from ..sizes import available_ram, format_size
from ..store.format import StoreError
from .stats import PagerStats


class BudgetError(ValueError):
    pass


class ExpertPager:
    def __init__(self, store, budget: int | None = None, policy: str = "lru", io_threads: int = 4,
                 direct_io: bool = False, verify: bool = True):
        from .._io import AlignedBuffer, Reader

        self.store, self.verify = store, verify
        size = self.record_size = store.layout.size
        total = sum(l.experts for l in store.layers.values())
        need = store.config.top_k
        if budget is None:  # default: everything, or half the free RAM if that is less
            budget = min(total * size, max(available_ram() // 2, need * size))
        n = min(total, budget // size)
        if n < need:
            raise BudgetError(
                f"expert budget {format_size(budget)} holds {n} expert records of {format_size(size)}; one token "
                f"needs {need} per layer: the minimum is {format_size(need * size)} ({need * size} bytes)")
        policies = registry().policies
        if policy not in policies:
            raise ValueError(f"unknown cache policy {policy!r}; registered: {', '.join(sorted(policies))}")
        self.capacity = n
        self.policy = policies[policy](n)
        self.buffer = AlignedBuffer(n * size)
        self.slots = torch.frombuffer(self.buffer, dtype=torch.uint8).view(n, size)
        self.slot_of: dict[tuple[int, int], int] = {}
        self.key_of: list = [None] * n
        self.free = list(range(n - 1, -1, -1))
        self.reader = Reader(nthreads=io_threads, direct=direct_io)
        self.fids = {layer: self.reader.open(str(store.layer_path(layer))) for layer in store.layers}
        self.stats = PagerStats(verify=verify)
        self.trace = None  # a pager.trace.RoutingTrace while recording (Engine.record)
        self._preload(self.policy.warm(store) if hasattr(self.policy, "warm") else [])

    def _preload(self, keys):
        """Load the keys a policy asks for at start (static: its pinned experts); not counted as
        hits or misses."""
        keys = [k for k in dict.fromkeys(keys) if k[0] in self.fids][:len(self.free)]
        self._load(keys, protected=set())
        self.stats.preloaded += len(keys)

    @property
    def budget(self) -> int:
        return self.capacity * self.record_size

    def resident(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.slot_of

    def _take_slot(self, protected: set) -> int:
        if self.free:
            return self.free.pop()
        key = self.policy.victim(protected)
        slot = self.slot_of.pop(key)
        self.policy.remove(key)
        self.key_of[slot] = None
        self.stats.evictions += 1
        return slot

    def acquire(self, layer: int, experts: list[int]) -> list[torch.Tensor]:
        """Make the given experts of one layer resident; returns their records (uint8 tensors),
        valid until the next acquire."""
        if len(set(experts)) > self.capacity:
            raise BudgetError(f"{len(set(experts))} experts requested at once; the pool holds {self.capacity}")
        if self.trace is not None:
            self.trace.request(layer, experts)
        misses = []
        for e in dict.fromkeys(experts):
            if (layer, e) in self.slot_of:
                self.stats.hits += 1
                self.policy.touch((layer, e))
            else:
                misses.append((layer, e))
        if misses:
            t0 = time.perf_counter()
            self._load(misses, protected={(layer, e) for e in experts})
            self.stats.misses += len(misses)
            self.stats.read_seconds += time.perf_counter() - t0
            self.stats.bytes_read += len(misses) * self.record_size
        return [self.slots[self.slot_of[(layer, e)]] for e in experts]

    def _load(self, keys, protected: set):
        """Read the records of non-resident keys into slots (evicting outside `protected`), with
        the reader threads, checking each record's checksum."""
        if not keys:
            return
        size, base = self.record_size, self.buffer.address
        requests, targets = [], []
        for (l, e) in keys:
            slot = self._take_slot(protected)
            requests.append((self.fids[l], e * size, size, base + slot * size,
                             self.store.record_crcs[l][e] if self.verify else None))
            targets.append(((l, e), slot))
        try:
            self.reader.read(requests)
        except OSError as err:
            self.free.extend(slot for _, slot in targets)
            (l, e), _ = targets[getattr(err, "index", 0)]
            cause = "checksum mismatch: the store is damaged (run `flashmoe inspect --verify`)" \
                if getattr(err, "kind", "") == "checksum" else str(err)
            raise StoreError(f"{self.store.layer_path(l)}: layer {l} expert {e}: {cause}") from err
        for key, slot in targets:
            self.slot_of[key] = slot
            self.key_of[slot] = key
            self.policy.insert(key)

    def close(self):
        self.reader.close()
