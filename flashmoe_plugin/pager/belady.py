"""Offline replacement, for grading the online policies.

The pager serves a sequence of requests; each request is the list of keys ((layer, expert)
pairs) one acquire call needs resident at once. One pool of `capacity` slots is shared by all
layers. A key already resident when its request starts is a hit; the misses are loaded, evicting
keys that are *not* in the current request (they are protected: the step needs them together).

belady(requests, capacity) applies Belady's MIN with that constraint: on each eviction it drops
the unprotected resident key whose next request lies farthest in the future. The classic
exchange argument carries over (a protected key is needed now, so no schedule may drop it), and
tests/test_policies.py checks it against an exhaustive search on small random traces.

simulate(policy, requests, capacity) runs an online Policy exactly as ExpertPager.acquire does,
so its hits equal the pager's on the same trace.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass


@dataclass
class Result:
    hits: int
    misses: int
    hits_per_request: list[int]

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def hit_rate_over(self, start: int, stop: int | None = None, sizes: list[int] | None = None) -> float:
        """Hit rate over requests[start:stop]; sizes: the number of keys of each request."""
        h = sum(self.hits_per_request[start:stop])
        n = sum(sizes[start:stop])
        return h / n if n else 0.0


def _unique(req):
    return list(dict.fromkeys(req))


def _check(requests, capacity):
    for i, r in enumerate(requests):
        if len(r) > capacity:
            raise ValueError(f"request {i} needs {len(r)} keys at once; capacity is {capacity}")


def belady(requests, capacity: int, preload=()) -> Result:
    requests = [_unique(r) for r in requests]
    _check(requests, capacity)
    # next_use[i][j]: index of the next request after i that needs requests[i][j]
    later: dict = {}
    next_use: list[list[float]] = [None] * len(requests)
    for i in range(len(requests) - 1, -1, -1):
        next_use[i] = [later.get(k, math.inf) for k in requests[i]]
        for k in requests[i]:
            later[k] = i
    current: dict = {}   # resident key -> its next use
    heap: list = []      # (-next use, tiebreak, key), stale entries skipped
    for k in list(dict.fromkeys(preload))[:capacity]:
        current[k] = later.get(k, math.inf)
        heapq.heappush(heap, (-current[k], repr(k), k))
    hits, per = 0, []
    for i, req in enumerate(requests):
        h = 0
        protected = set(req)
        for k, nxt in zip(req, next_use[i]):
            if k in current:
                h += 1
            elif len(current) >= capacity:
                stash = []
                while True:
                    e = heapq.heappop(heap)
                    key = e[2]
                    if key not in current or current[key] != -e[0]:
                        continue
                    if key in protected:
                        stash.append(e)
                        continue
                    del current[key]
                    break
                for e in stash:
                    heapq.heappush(heap, e)
            current[k] = nxt
            heapq.heappush(heap, (-nxt, repr(k), k))
        hits += h
        per.append(h)
    total = sum(len(r) for r in requests)
    return Result(hits, total - hits, per)


def brute_force(requests, capacity: int) -> int:
    """The most hits any eviction schedule achieves (exhaustive; tiny traces only)."""
    from functools import lru_cache
    from itertools import combinations

    requests = [tuple(_unique(r)) for r in requests]
    _check(requests, capacity)

    @lru_cache(maxsize=None)
    def best(i: int, state: frozenset) -> int:
        if i == len(requests):
            return 0
        req = requests[i]
        hits = sum(k in state for k in req)
        missing = [k for k in req if k not in state]
        over = len(state) + len(missing) - capacity
        evictable = sorted((k for k in state if k not in req), key=repr)
        if over <= 0:
            return hits + best(i + 1, state | frozenset(missing))
        return hits + max(best(i + 1, (state - frozenset(drop)) | frozenset(missing))
                          for drop in combinations(evictable, over))

    return best(0, frozenset())


def simulate(policy, requests, capacity: int | None = None, preload=()) -> Result:
    """Run a Policy instance over the requests the way ExpertPager.acquire does."""
    capacity = capacity or policy.capacity
    requests = [_unique(r) for r in requests]
    _check(requests, capacity)
    resident: set = set()
    for k in list(dict.fromkeys(preload))[:capacity]:
        resident.add(k)
        policy.insert(k)
    hits, per = 0, []
    for req in requests:
        h, protected, loaded = 0, set(req), []
        for k in req:
            if k in resident:
                h += 1
                policy.touch(k)
                continue
            if len(resident) + len(loaded) >= capacity:
                v = policy.victim(protected)
                resident.discard(v)
                policy.remove(v)
            loaded.append(k)
        for k in loaded:
            resident.add(k)
            policy.insert(k)
        hits += h
        per.append(h)
    total = sum(len(r) for r in requests)
    return Result(hits, total - hits, per)
