"""Cache replacement policies for the pager's slot pools. A policy sees only keys
((layer, expert) pairs) and capacity: never architectures or bytes."""
from __future__ import annotations

from collections import OrderedDict

from ..hookspecs import hookimpl


class Policy:
    """touch(key) on every use, insert(key) when loaded, victim(protected) picks what to evict
    (never a key in `protected`: the experts the current step needs), remove(key) after eviction."""

    def __init__(self, capacity: int):
        self.capacity = capacity

    def touch(self, key): ...
    def insert(self, key): ...
    def remove(self, key): ...
    def victim(self, protected: set):
        raise NotImplementedError


class LRU(Policy):
    def __init__(self, capacity):
        super().__init__(capacity)
        self.order = OrderedDict()

    def touch(self, key):
        self.order.move_to_end(key)

    def insert(self, key):
        self.order[key] = None

    def remove(self, key):
        self.order.pop(key, None)

    def victim(self, protected):
        for key in self.order:
            if key not in protected:
                return key
        raise RuntimeError("no evictable entry: every cached expert is in use by this step")


class LFU(Policy):
    """Least frequently used over the whole run (counts survive eviction), LRU among ties."""

    def __init__(self, capacity):
        super().__init__(capacity)
        self.count: dict = {}
        self.lru = LRU(capacity)

    def touch(self, key):
        self.count[key] = self.count.get(key, 0) + 1
        self.lru.touch(key)

    def insert(self, key):
        self.count[key] = self.count.get(key, 0) + 1
        self.lru.insert(key)

    def remove(self, key):
        self.lru.remove(key)

    def victim(self, protected):
        rank = {k: i for i, k in enumerate(self.lru.order)}
        candidates = [k for k in self.lru.order if k not in protected]
        if not candidates:
            raise RuntimeError("no evictable entry: every cached expert is in use by this step")
        return min(candidates, key=lambda k: (self.count.get(k, 0), rank[k]))


@hookimpl
def register_cache_policies(register):
    register("lru", LRU)
    register("lfu", LFU)
