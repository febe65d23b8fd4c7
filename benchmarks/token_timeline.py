"""Where a decode token's time goes on a store bigger than RAM (issue 10's 2-core row 0).

    python benchmarks/token_timeline.py STORE --tokens 16 --json out.json [--trace out.npz]

The engine as `flashmoe bench --device cpu` builds it (defaults, 8 reader threads, the page cache
dropped first), a 16-token prompt, then decode with, per token: wall time; per MoE layer the
experts' wall time and the stall in it (the pager's read_seconds); the rest (dense part,
attention, look-ahead) as wall less the layers; the bytes read (demand and prefetch), the misses;
and the block device's own counters (/proc/diskstats: bytes read, busy time), so the reads'
achieved GB/s and the disk's utilisation stand beside the disk's rate measured just before decode
(an O_DIRECT read of records, bench.store.disk_bandwidth); /proc/vmstat's compaction, huge-page
and reclaim counters over prefill and over decode. --trace saves the routing trace for
replaying policies offline (policy_replay.py)."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def diskstats(dev: str | None = None) -> dict:
    """{"read_bytes", "busy_ms"} of the block device holding /tmp (or dev), from /proc/diskstats."""
    if dev is None:
        st = os.stat("/tmp").st_dev
        dev = f"{os.major(st)}:{os.minor(st)}"
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if f"{f[0]}:{f[1]}" == dev or f[2] == dev:
            return {"read_bytes": int(f[5]) * 512, "busy_ms": int(f[12]), "read_ms": int(f[6])}
    return {"read_bytes": 0, "busy_ms": 0, "read_ms": 0}


VMSTAT = ("compact_stall", "compact_fail", "compact_daemon_wake", "compact_migrate_scanned", "thp_fault_alloc",
          "thp_fault_fallback", "pgmajfault", "pgscan_kswapd", "pgscan_direct", "allocstall_normal")


def vmstat() -> dict:
    """The kernel's counters that tell compaction, huge-page faults and reclaim (/proc/vmstat)."""
    out = {}
    for line in Path("/proc/vmstat").read_text().splitlines():
        k, v = line.split()
        if k in VMSTAT:
            out[k] = int(v)
    return out


def delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a.get(k, 0) for k in b}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--io-threads", type=int, default=8)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--trace", type=Path, default=None)
    ap.add_argument("--engine", default="{}", help="extra Engine keyword arguments, as JSON")
    ap.add_argument("--no-drop", action="store_true", help="evict the store's files only (a dry run beside others' timings)")
    a = ap.parse_args(argv)
    import torch
    from flashmoe_plugin.bench.store import _decode, _evict, disk_bandwidth, peak_rss_bytes, prompt_ids
    from flashmoe_plugin.pager.trace import RoutingTrace
    from flashmoe_plugin.runtime.engine import Engine
    from flashmoe_plugin.store.model import open_model

    store = open_model(a.store)
    probe0 = disk_bandwidth(store, direct=True, drop=not a.no_drop, io_threads=a.io_threads)
    eng = Engine(store, device="cpu", io_threads=a.io_threads, n_ctx=a.prompt_tokens + a.tokens + 8,
                 **json.loads(a.engine))
    p = eng.pager
    trace = RoutingTrace()
    eng.record(trace)
    _evict(p.reader, p.fids.values())
    layers: list[dict] = []
    inner = eng._experts

    def timed(layer, x, ids, weights, h, host=None):
        s0, m0, t0 = p.stats.read_seconds, p.stats.misses, time.perf_counter()
        out = inner(layer, x, ids, weights, h, host)
        if x.shape[0] == 1:
            layers.append({"layer": layer, "wall_ms": (time.perf_counter() - t0) * 1e3,
                           "stall_ms": (p.stats.read_seconds - s0) * 1e3, "misses": p.stats.misses - m0})
        return out
    eng._experts = timed
    ids = prompt_ids(eng.tokenizer, a.prompt_tokens, store.config.vocab_size)
    v0 = vmstat()
    t0 = time.perf_counter()
    logits = eng.forward(ids, last_only=True)[-1]
    ttft = time.perf_counter() - t0
    v1 = vmstat()
    probe1 = disk_bandwidth(store, direct=True, drop=False, io_threads=a.io_threads, max_seconds=1.0)
    tokens = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(a.tokens):
        tok = int(torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen))
        layers.clear()
        s, d = p.stats.snapshot(), diskstats()
        t = time.perf_counter()
        logits = eng.forward([tok], last_only=True)[-1]
        wall = (time.perf_counter() - t) * 1e3
        s2, d2 = p.stats.snapshot(), diskstats()
        moe = sum(l["wall_ms"] for l in layers)
        stall = sum(l["stall_ms"] for l in layers)
        rb = d2["read_bytes"] - d["read_bytes"]
        tokens.append({
            "wall_ms": wall, "moe_wall_ms": moe, "stall_ms": stall, "compute_ms": wall - stall,
            "rest_ms": wall - moe, "misses": s2["misses"] - s["misses"],
            "prefetch_reads": s2["prefetch_reads"] - s["prefetch_reads"],
            "bytes_read": s2["bytes_read"] - s["bytes_read"], "disk_read_bytes": rb,
            "disk_gbps_over_token": rb / wall / 1e6, "disk_busy": (d2["busy_ms"] - d["busy_ms"]) / wall,
            "stall_by_layer_ms": [round(l["stall_ms"], 1) for l in layers if l["stall_ms"] > 0.5],
            "misses_by_layer": [l["misses"] for l in layers if l["misses"]]})
    v2 = vmstat()
    probe2 = disk_bandwidth(store, direct=True, drop=False, io_threads=a.io_threads, max_seconds=1.0)

    def anon_huge_mib():
        with open("/proc/self/smaps_rollup") as f:
            return next((int(l.split()[1]) // 1024 for l in f if l.startswith("AnonHugePages:")), None)

    def mean(k):
        return sum(t[k] for t in tokens) / len(tokens)
    doc = {"store": str(a.store), "engine": json.loads(a.engine), "load_avg": os.getloadavg(),
           "capacity_records": p.capacity, "record_bytes": store.layout.size, "ttft_s": ttft, "anon_huge_mib": anon_huge_mib(), "peak_rss_bytes": peak_rss_bytes(),
           "disk_gbps_before_prefill": probe0["gbps"], "disk_gbps_before_decode": probe1["gbps"],
           "disk_gbps_after_decode": probe2["gbps"],
           "decode_tok_s": 1e3 / mean("wall_ms"), "vmstat_prefill": delta(v0, v1), "vmstat_decode": delta(v1, v2),
           "mean": {k: mean(k) for k in ("wall_ms", "moe_wall_ms", "stall_ms", "compute_ms", "rest_ms", "misses",
                                         "prefetch_reads", "bytes_read", "disk_read_bytes", "disk_gbps_over_token",
                                         "disk_busy")},
           "prefetch_stats": {k: p.stats.snapshot()[k] for k in ("prefetch_reads", "prefetch_used", "prefetch_wasted")},
           "tokens": tokens}
    a.json.write_text(json.dumps(doc, indent=1) + "\n")
    if a.trace:
        trace.save(a.trace)
    m = doc["mean"]
    print(f"{doc['decode_tok_s']:.3f} tok/s: wall {m['wall_ms']:.0f} ms = stall {m['stall_ms']:.0f} + compute "
          f"{m['compute_ms']:.0f} (rest {m['rest_ms']:.0f}); {m['misses']:.2f} misses, {m['prefetch_reads']:.2f} "
          f"prefetches, {m['bytes_read'] / 1e9:.3f} GB read per token, disk {m['disk_gbps_over_token']:.2f} GB/s "
          f"over tokens (busy {m['disk_busy']:.2f}); probe {probe1['gbps']:.2f} / {probe2['gbps']:.2f} GB/s")
    eng.close()


if __name__ == "__main__":
    main()
