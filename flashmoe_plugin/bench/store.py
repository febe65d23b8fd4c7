"""End-to-end figures of a store, each next to its bound measured in the same run:
`flashmoe bench STORE --json` (run_bench) and `flashmoe profile STORE` (run_profile).

run_bench, in order:
1. disk bandwidth: reader threads read the store's expert records (random order, each record
   at most once, whole records as the pager reads them) after dropping the page cache
   (--drop-caches, where permitted) or evicting the expert files (posix_fadvise via
   Reader.evict);
2. the engine with the requested budget and policy, routing trace recording on, expert files
   evicted again; prefill of a `prompt_tokens` prompt (TTFT, prefill tok/s), then `tokens`
   decode steps, sampled at `temp` with a fixed seed so runs repeat (0 = greedy): decode
   tok/s, hit rate, bytes read and stall per token;
3. I/O bound = bandwidth / missed bytes per decode token; io_efficiency = tok/s / bound;
4. Belady's MIN on the recorded pager requests with the same capacity (belady.py);
5. compute bound: a second engine holding every expert (preloaded), same prompt and decode, if
   the experts fit in half the free RAM; else null with the reason.
GPU-tier figures (h2d bandwidth, VRAM hit rate, bytes copied, predictor precision/recall) are
present as null until the GPU pager exists.
"""
from __future__ import annotations

import gc
import os
import platform
import random
import time
from pathlib import Path

import torch

from ..sizes import available_ram, format_size, parse_size

GPU_KEYS = ("h2d_gbps", "vram_budget", "vram_hit_rate", "bytes_copied_to_device_per_token",
            "predictor_precision", "predictor_recall", "prefetch")

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "def quicksort(xs):\n    \"\"\"Sort a list of numbers.\"\"\"\n",
    "Q: What is the capital of France, and why did it become the capital?\nA:",
    "Write a short poem about a lighthouse keeper who reads books at night.",
    "Les experts du modèle sont lus depuis le disque à chaque jeton, et",
    "User: Summarise the plot of Hamlet in three sentences.\nAssistant:",
]
TEXT = " ".join(PROMPTS) + (
    " A mixture-of-experts model routes every token to a few of its experts; the pager keeps the hot"
    " ones in memory and reads the others from the disk while the rest of the model computes. ")


def prompt_ids(tokenizer, n: int, vocab: int) -> list[int]:
    ids = tokenizer.encode(TEXT, add_bos=False)
    ids = [i for i in ids if i < vocab] or [0]
    return (ids * (n // len(ids) + 1))[:n]


def drop_page_cache() -> tuple[bool, str]:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True, "dropped"
    except OSError as e:
        return False, f"drop_caches not permitted ({e.strerror}); expert files evicted instead"


def _evict(reader, fids) -> str:
    try:
        for fid in fids:
            reader.evict(fid)
        return "evicted"
    except (OSError, AttributeError) as e:
        return f"not evicted ({e})"


def disk_bandwidth(store, direct: bool = False, drop: bool = False, io_threads: int = 4,
                   max_bytes: int = 1 << 30, max_seconds: float = 2.0) -> dict:
    """Read whole expert records in random order, each at most once, through the C reader."""
    from ..io import AlignedBuffer, Reader

    size = store.layout.size
    keys = [(l, e) for l, info in store.layers.items() for e in range(info.experts)]
    random.Random(0).shuffle(keys)
    per_batch = max(store.config.top_k, io_threads)
    buf = AlignedBuffer(per_batch * size)
    with Reader(nthreads=io_threads, direct=direct) as reader:
        fids = {l: reader.open(str(store.layer_path(l))) for l in store.layers}
        cache = drop_page_cache()[1] if drop else "kept"
        if not drop or cache != "dropped":
            cache = _evict(reader, fids.values()) if cache == "kept" else cache
        done, t0 = 0, time.perf_counter()
        for i in range(0, len(keys), per_batch):
            batch = keys[i:i + per_batch]
            reader.read([(fids[l], e * size, size, buf.address + j * size, None) for j, (l, e) in enumerate(batch)])
            done += len(batch) * size
            if done >= max_bytes or time.perf_counter() - t0 >= max_seconds:
                break
        seconds = time.perf_counter() - t0
        _evict(reader, fids.values())
    return {"gbps": done / seconds / 1e9, "bytes": done, "seconds": seconds, "page_cache": cache,
            "direct_io": direct, "threads": io_threads, "records_per_batch": per_batch}


def _decode(engine, logits, n: int, temp: float = 0.0, seed: int = 0) -> tuple[float, list[float]]:
    """n decode steps, greedy (temp <= 0) or sampled from the full distribution with a seeded
    generator (random-weight stores fall into greedy fixed points that would hide the pager)."""
    from ..runtime.sampling import Sampler, SamplingParams
    sample = Sampler(SamplingParams(temperature=temp, top_k=0, top_p=1.0, min_p=0.0, seed=seed))
    times = []
    for _ in range(n):
        tok = sample(logits, engine.tokens)  # temp <= 0: argmax
        t0 = time.perf_counter()
        logits = engine.forward([tok], last_only=True)[-1]
        times.append(time.perf_counter() - t0)
    return sum(times), times


def _rate(d: dict) -> float | None:
    n = d["hits"] + d["misses"]
    return d["hits"] / n if n else None


def _compute_bound(store, device, ids, tokens, verify, backend, temp, seed) -> dict:
    from ..runtime.engine import Engine
    need = store.expert_bytes
    if need > available_ram() // 2:
        return {"compute_bound_tok_s": None, "compute_bound_prefill_tok_s": None,
                "compute_bound_reason": f"experts ({format_size(need)}) do not fit in half the free RAM "
                                        f"({format_size(available_ram())} free)"}
    eng = Engine(store, device=device, ram_budget=need, n_ctx=len(ids) + tokens + 8, verify=verify, backend=backend)
    try:
        for l, info in store.layers.items():
            eng.pager.acquire(l, list(range(info.experts)))
        before = eng.pager.stats.snapshot()
        t0 = time.perf_counter()
        logits = eng.forward(ids, last_only=True)[-1]
        prefill = time.perf_counter() - t0
        secs, _ = _decode(eng, logits, tokens, temp, seed)
        assert eng.pager.stats.delta(before)["misses"] == 0
    finally:
        eng.close()
    return {"compute_bound_tok_s": tokens / secs, "compute_bound_prefill_tok_s": len(ids) / prefill,
            "compute_bound_reason": "measured: every expert resident in RAM, same prompt and decode"}


def run_bench(store_path, device: str = "cpu", ram_budget=None, policy: str = "lru", tokens: int = 32,
              prompt_tokens: int = 512, direct_io: bool = False, drop_caches: bool = False,
              verify: bool = True, io_threads: int = 4, backend: str | None = None,
              compute_bound: bool = True, temp: float = 1.0, seed: int = 0, save_trace=None) -> dict:
    from ..pager.belady import belady
    from ..pager.trace import RoutingTrace
    from ..runtime.engine import Engine, resolve_device
    from ..store.format import Store

    resolve_device(device)  # a clear error before any work
    store = Store.open(store_path)
    if tokens < 1 or prompt_tokens < 1:
        raise ValueError("--tokens and --prompt-tokens must be at least 1")
    notes = ["GPU-tier keys (" + ", ".join(GPU_KEYS) + ") are null: they come with the GPU pager"]
    disk = disk_bandwidth(store, direct=direct_io, drop=drop_caches, io_threads=io_threads)
    if disk["page_cache"] not in ("dropped", "evicted"):
        notes.append(f"disk bandwidth measured with the page cache {disk['page_cache']}")

    eng = Engine(store, device=device, ram_budget=parse_size(ram_budget), policy=policy, io_threads=io_threads,
                 direct_io=direct_io, verify=verify, backend=backend, n_ctx=prompt_tokens + tokens + 8)
    p = eng.pager
    trace = RoutingTrace()
    eng.record(trace)
    _evict(p.reader, p.fids.values())
    ids = prompt_ids(eng.tokenizer, prompt_tokens, store.config.vocab_size)
    try:
        s0 = p.stats.snapshot()
        t0 = time.perf_counter()
        logits = eng.forward(ids, last_only=True)[-1]
        ttft = time.perf_counter() - t0
        s1 = p.stats.snapshot()
        mark = len(trace)
        decode_s, _ = _decode(eng, logits, tokens, temp, seed)
        dec = p.stats.delta(s1)
        pre = {k: s1[k] - s0[k] for k in ("hits", "misses", "bytes_read", "read_seconds")}
    finally:
        eng.record(None)
        eng.close()
    capacity, size, pol = p.capacity, p.record_size, p.policy
    preloaded = p.stats.preloaded
    total_records = sum(l.experts for l in store.layers.values())
    del eng, p
    gc.collect()

    if save_trace:  # e.g. STORE/routing_trace.npz: a rerun with --policy belady then replays this run
        trace.meta = {"tool": "flashmoe bench", "capacity": capacity, "policy": policy, "temp": temp, "seed": seed,
                      "prompt_tokens": len(ids), "tokens": tokens}
        trace.save(save_trace)
    reqs = trace.request_keys()
    opt = belady(reqs, capacity)
    sizes = [len(r) for r in reqs]
    run_hits, run_n = pre["hits"] + dec["hits"], pre["hits"] + pre["misses"] + dec["hits"] + dec["misses"]
    hit_rate_run = run_hits / run_n if run_n else None
    decode_tok_s = tokens / decode_s
    missed = dec["misses"] * size / tokens
    io_bound = disk["gbps"] * 1e9 / missed if missed else None
    if io_bound is None:
        notes.append("no expert misses while decoding: the run is not I/O bound (io_bound_tok_s null)")
    if preloaded:
        notes.append(f"{preloaded} records preloaded by the policy at start are not counted as misses; "
                     "belady starts from an empty pool")
    if not direct_io:
        notes.append("buffered reads: records evicted from the pool may come back from the OS page cache "
                     "(faster than the disk bandwidth measured cold)")

    result = {
        "store": str(store.path), "architecture": store.architecture, "quant": store.quant,
        "source": store.manifest.get("source", {}).get("type"), "like": store.manifest.get("source", {}).get("like"),
        "moe_layers": len(store.layers), "record_bytes": size, "expert_bytes": store.expert_bytes,
        "dense_bytes": (store.path / "dense.safetensors").stat().st_size,
        "device": device, "backend": None, "policy": policy, "policy_note": getattr(pol, "note", "") or None,
        "ram_budget": capacity * size, "capacity_records": capacity, "total_records": total_records,
        "direct_io": direct_io, "verify": verify, "drop_caches": drop_caches,
        "prompt_tokens": len(ids), "tokens": tokens, "temp": temp, "seed": seed,
        "ttft_s": ttft, "prefill_tok_s": len(ids) / ttft, "decode_tok_s": decode_tok_s,
        "hit_rate": _rate(dec), "hit_rate_prefill": _rate(pre), "hit_rate_run": hit_rate_run,
        "tiers": {"ram": {"hit_rate": _rate(dec), "hits": dec["hits"], "misses": dec["misses"],
                          "budget": capacity * size}, "vram": None},
        "bytes_read_per_token": dec["bytes_read"] / tokens, "missed_bytes_per_token": missed,
        "stall_ms_per_token": dec["read_seconds"] * 1e3 / tokens,
        "prefill_bytes_read": pre["bytes_read"], "prefill_stall_s": pre["read_seconds"],
        "disk_bandwidth_gbps": disk["gbps"], "disk": disk,
        "io_bound_tok_s": io_bound, "io_efficiency": decode_tok_s / io_bound if io_bound else None,
        "belady_hit_rate": opt.hit_rate, "belady_hit_rate_decode": opt.hit_rate_over(mark, None, sizes),
        "hit_rate_vs_belady": hit_rate_run / opt.hit_rate if opt.hit_rate and hit_rate_run is not None else None,
        "requests": len(reqs),
        **{k: None for k in GPU_KEYS},
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "ram_free": available_ram(), "load_avg_1m": os.getloadavg()[0]},
        "notes": notes,
    }
    from .. import kernels
    result["backend"] = kernels.select(device, backend).name
    if compute_bound:
        result.update(_compute_bound(store, device, ids, tokens, verify, backend, temp, seed))
    else:
        result.update(compute_bound_tok_s=None, compute_bound_prefill_tok_s=None,
                      compute_bound_reason="skipped (compute_bound=False)")
    cb = result["compute_bound_tok_s"]
    result["compute_efficiency"] = decode_tok_s / cb if cb else None
    return result


def run_profile(store_path, prompts: list[str] | None = None, n: int = 64, ram_budget=None, policy: str = "lru",
                trace_path=None, device: str = "cpu", verify: bool = True, temp: float = 0.0, seed: int = 0) -> dict:
    """Generate n tokens after each prompt (greedy, or sampled at temp with a fixed seed) with routing recorded; writes routing_stats.json
    into the store folder (atomic replace) and the routing trace (default STORE/routing_trace.npz)."""
    from ..pager.trace import TRACE_FILE, RoutingTrace, write_routing_stats
    from ..runtime.engine import Engine

    prompts = [p for p in (prompts or PROMPTS) if p.strip()]
    if not prompts:
        raise ValueError("no prompts to profile")
    eng = Engine(store_path, device=device, ram_budget=parse_size(ram_budget), policy=policy, verify=verify,
                 n_ctx=2048)
    store, cfg = eng.store, eng.config
    trace = RoutingTrace()
    eng.record(trace)
    generated = 0
    try:
        for text in prompts:
            eng.reset()
            ids = [i for i in eng.tokenizer.encode(text, add_bos=True) if i < cfg.vocab_size][:2048 - n - 1] or [0]
            logits = eng.forward(ids, last_only=True)[-1]
            _decode(eng, logits, n, temp, seed)
            generated += n
        stats = eng.pager.stats.snapshot()
    finally:
        eng.record(None)
        eng.close()
    counts = trace.counts(cfg.num_experts)
    routed = trace.tokens()
    stats_path = write_routing_stats(store.path, counts, routed, cfg.top_k, cfg.num_experts,
                                     {"prompts": len(prompts), "tokens_per_prompt": n, "tool": "flashmoe profile"})
    trace.meta = {"top_k": cfg.top_k, "num_experts": cfg.num_experts, "capacity": eng.pager.capacity,
                  "policy": policy, "prompts": len(prompts), "tokens_per_prompt": n, "temp": temp, "seed": seed}
    trace_path = Path(trace_path) if trace_path else store.path / TRACE_FILE
    trace.save(trace_path)
    per_layer = {}
    for l, c in counts.items():
        c = sorted(c.tolist(), reverse=True)
        top = max(1, len(c) // 10)
        per_layer[l] = {"experts_used": sum(1 for x in c if x), "top10pct_share": sum(c[:top]) / max(sum(c), 1)}
    return {"routing_stats": str(stats_path), "trace": str(trace_path), "prompts": len(prompts),
            "tokens_routed": routed, "tokens_generated": generated, "requests": len(trace),
            "hit_rate": stats["hit_rate"], "layers": per_layer}
