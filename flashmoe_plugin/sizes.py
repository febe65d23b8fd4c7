"""Sizes and rates, read and written the same way everywhere.

Reading (budgets on the CLI, in Engine and in Llama): `512M`, `8G`, `1.5GiB`, `0`, plain bytes,
or a percentage of the model's expert bytes (`50%`). K/M/G/T are binary (2^10, 2^20, ...),
with or without `iB`/`B`. Anything else is a ValueError whose message shows the accepted forms.

Writing: binary units for what people read, sizes (`format_size`: KiB, MiB, GiB) and rates
alike (`format_rate`: MiB/s, GiB/s), so no printed line mixes 2^30 and 10^9. Machine-read JSON
keeps bytes, and rates in keys named `*_gbps`, which are 10^9 bytes per second (the STREAM
convention of the kernel and store benchmarks).
"""
from __future__ import annotations

import os
import re

import click

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(?:([kKmMgGtT]?)(i?[bB])?|(%))\s*")
FORMS = "e.g. 512M, 8G, 1.5GiB, a number of bytes, or 50% of the model's expert bytes"


def parse_size(value, of: int | None = None, name: str = "size") -> int | None:
    """Bytes from `value` (None stays None). A percentage is taken of `of` (the model's expert
    bytes); without `of` it is refused, naming `name`."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}: not a size: {value!r} ({FORMS})")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{name}: a size cannot be negative ({value!r})")
        return int(value)
    m = _SIZE.fullmatch(str(value))
    if not m:
        raise ValueError(f"{name}: not a size: {value!r} ({FORMS})")
    number = float(m.group(1))
    if m.group(4):
        if of is None:
            raise ValueError(f"{name}: a percentage ({value!r}) needs the model's expert bytes; give a size here")
        return int(of * number / 100)
    return int(number * _UNITS[(m.group(2) or "").lower()])


def check_size(value, name: str = "size"):
    """Validate the syntax now (a percentage resolved later, once the model is open); returns value."""
    parse_size(value, of=0, name=name)
    return value


class SizeType(click.ParamType):
    """A click option type: checks a size or percentage at parse time (a one-line usage error,
    before any model is loaded) and passes the text on for the engine to resolve."""
    name = "size"

    def convert(self, value, param, ctx):
        try:
            return check_size(value, name=param.opts[0] if param is not None else "size")
        except ValueError as e:
            self.fail(str(e).split(": ", 1)[-1], param, ctx)


SIZE = SizeType()


def format_size(n: int | float) -> str:
    """Binary units: 512 B, 35.33 MiB, 2.12 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def format_rate(bytes_per_second: float | None) -> str:
    """Binary units per second, like format_size: 0.27 GiB/s below 1 GiB/s is 276.5 MiB/s."""
    if bytes_per_second is None:
        return "n/a"
    if bytes_per_second >= 1 << 30:
        return f"{bytes_per_second / (1 << 30):.2f} GiB/s"
    return f"{bytes_per_second / (1 << 20):.1f} MiB/s"


def available_ram() -> int:
    """RAM this process can still take: the kernel's MemAvailable (free plus reclaimable page
    cache), or less when a memory cgroup (v1 or v2) limits the process more tightly."""
    avail = _meminfo("MemAvailable")
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 8 << 30
    room = cgroup_room()
    return avail if room is None else min(avail, room)


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text)


def _stat(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
    except OSError:
        pass
    return 0


def cgroup_room() -> int | None:
    """Bytes the tightest memory cgroup above this process still allows (its limit less its usage,
    counting inactive page cache as free, as the kernel reclaims it first); None when unlimited."""
    rooms = _cgroups()
    return min(r for _, r in rooms) if rooms else None


def cgroup_limit() -> int | None:
    """The tightest memory cgroup limit above this process (bytes); None when unlimited."""
    rooms = _cgroups()
    return min(lim for lim, _ in rooms) if rooms else None


def _cgroups() -> list[tuple[int, int]]:
    """(limit, room) of every memory-limited cgroup above this process, v1 or v2."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.strip().split(":", 2) for line in f if line.strip()]
    except OSError:
        return []
    rooms = []
    for _, controllers, path in lines:
        if controllers == "":  # cgroup v2
            base, limit, usage, stat, inactive = "/sys/fs/cgroup", "memory.max", "memory.current", "memory.stat", "inactive_file"
        elif "memory" in controllers.split(","):
            base, limit, usage, stat, inactive = "/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for i in range(len(parts), -1, -1):  # the cgroup and its ancestors
            d = "/".join([base] + parts[:i])
            lim = _read_int(f"{d}/{limit}")
            if lim is None or lim >= 1 << 60:
                continue
            used = (_read_int(f"{d}/{usage}") or 0) - _stat(f"{d}/{stat}", inactive)
            rooms.append((lim, max(0, lim - max(0, used))))
    return rooms


def ram_reserve(working_set: int = 1 << 30) -> int:
    """RAM left free by the default budgets: `working_set` for the process's own growth beyond its
    weights, caches and KV cache after it measured the free RAM (default 1 GiB, what a CUDA
    engine's host side keeps; a CPU engine passes working_set(): its prefill chunk's
    activations), plus 2% of the machine (or cgroup) for the kernel and other processes.
    FLASHMOE_RAM_RESERVE (a size) overrides it."""
    forced = os.environ.get("FLASHMOE_RAM_RESERVE")
    if forced:
        return parse_size(forced)
    total = min(_meminfo("MemTotal") or (16 << 30), cgroup_limit() or 1 << 62)
    return working_set + total // 50


def working_set(config, n_batch: int, n_ctx: int) -> int:
    """What a CPU engine allocates beyond its weights, expert cache and KV cache while it runs:
    128 MiB (allocator slack, reader threads, the pager's and predictor's books) and one prefill
    chunk's fp32 activations, per token 8 hidden vectors, 3 MLP intermediates, a score row per
    head over the context and a row of logits. Measured on a 2-layer Mixtral-shaped store
    (q8 dense): a 512-token chunk grew the peak RSS by 118 MB where this counts 254 MB; 16
    tokens on the 32-layer store: ~50 MB (the former fixed 1 GiB left ~6 records of 94.5 MiB
    idle on the 2-core machine: benchmarks/README.md, "Session 9")."""
    inter = max(config.moe_intermediate_size, getattr(config, "dense_intermediate_size", 0) or 0,
                getattr(config, "shared_expert_intermediate_size", 0) or 0)
    per_token = 8 * config.hidden_size + 3 * inter + config.num_heads * n_ctx + config.vocab_size
    return (128 << 20) + 4 * per_token * min(n_batch, n_ctx)
