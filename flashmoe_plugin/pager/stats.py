"""Pager counters. `snapshot()` gives plain numbers for bench, the shell toolbar and on_token.

A demand request for a record is a hit when the record is already in a tier (device: `device_hits`,
host: `host_hits`) and a miss when it must come from disk (also when a prefetch read of it is
still in flight: the prefetch then only shortens the wait). `bytes_read` counts every disk read,
prefetches included; `read_seconds` is the time compute waited for disk reads (the stall)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

COUNTERS = ("hits", "misses", "device_hits", "host_hits", "host_computed", "evictions", "demoted", "bytes_read", "bytes_copied",
            "read_seconds", "prefetch_reads", "prefetch_copies", "prefetch_used", "prefetch_cancelled",
            "prefetch_wasted")


@dataclass
class PagerStats:
    hits: int = 0
    misses: int = 0
    device_hits: int = 0        # found in tier 0 (VRAM, or RAM on CPU runs)
    host_hits: int = 0          # found in the host tier (pinned RAM): copied up, or computed there
    host_computed: int = 0      # host hits computed on the CPU from pinned RAM instead of copied up
    evictions: int = 0          # tier 0 victims (demoted to the host tier when there is one)
    demoted: int = 0
    bytes_read: int = 0         # from disk, prefetches included
    bytes_copied: int = 0       # host -> device
    read_seconds: float = 0.0   # time compute waited on disk reads (stall)
    prefetch_reads: int = 0     # records a prefetch read from disk
    prefetch_copies: int = 0    # records a prefetch copied up from the host tier
    prefetch_used: int = 0      # prefetched records a later demand used
    prefetch_cancelled: int = 0  # prefetch reads dropped because the real routing disagreed
    prefetch_wasted: int = 0    # prefetched records evicted or cancelled before any use
    preloaded: int = 0          # records a policy loaded at start (static: pinned experts)
    read_retries: int = 0       # demand reads tried again after a transient failure
    read_failures: int = 0      # reads that failed for good (demand: the request failed)
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
        out = {k: now[k] - before[k] for k in COUNTERS}
        n = out["hits"] + out["misses"]
        out["hit_rate"] = out["hits"] / n if n else 0.0
        return out
