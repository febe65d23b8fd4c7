"""Pager counters. `snapshot()` gives plain numbers for bench, the shell toolbar and on_token."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class PagerStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0   # time compute waited on reads (stall)
    preloaded: int = 0          # records a policy loaded at start (static: pinned experts)
    verify: bool = True

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def snapshot(self) -> dict:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        return d

    def delta(self, before: dict) -> dict:
        now = self.snapshot()
        out = {k: now[k] - before[k] for k in ("hits", "misses", "evictions", "bytes_read", "read_seconds")}
        n = out["hits"] + out["misses"]
        out["hit_rate"] = out["hits"] / n if n else 0.0
        return out
