"""End-to-end figures of a store, each next to its bound measured in the same run:
`flashmoe bench STORE --json` (run_bench) and `flashmoe profile STORE` (run_profile).

run_bench, in order:
1. disk bandwidth: reader threads read the store's expert records (random order, each record
   at most once, whole records as the pager reads them) after dropping the page cache
   (--drop-caches, where permitted) or evicting the expert files (posix_fadvise via
   Reader.evict); on CUDA also the pinned host->device copy bandwidth and the device memory
   bandwidth (a device-to-device copy);
2. the engine with the requested budgets, policy and prefetch mode, routing trace recording on,
   expert files evicted again; prefill of a `prompt_tokens` prompt (TTFT, prefill tok/s), then
   `tokens` decode steps, sampled at `temp` with a fixed seed so runs repeat (0 = greedy):
   decode tok/s, hit rate per tier, bytes read and copied and stall per token, predictor
   precision/recall; with `depth`, the decode again from that many tokens of context, as
   llama-bench times it (bench/depth.py); then the same prompt again, warm (bench/warm.py: the
   median of a few);
3. I/O bound = disk bandwidth / bytes read from disk per decode token (prefetches included);
   io_efficiency = tok/s / bound; on CUDA likewise the copy bound (h2d bandwidth / bytes
   copied per token);
4. Belady's MIN on the recorded pager requests with the capacity of all tiers together
   (belady.py), against the run's hit rate in any tier;
5. compute bound: a second engine holding every expert (preloaded), same prompt (timed after one
   untimed warm-up prefill) and decode, if
   the experts fit (in half the free RAM; on CUDA in free VRAM); else null with the reason. On
   CUDA also the kernel bound: device memory bandwidth / bytes of weights one token reads.
"""
from __future__ import annotations

import gc
import math
import os
import platform
import random
import time
from pathlib import Path

import torch

from ..progress import NO_PROGRESS
from ..runtime.dense_quant import dense_bytes
from ..sizes import available_ram, format_size, parse_size
from .depth import decode_at_depth
from .launches import decode_launches
from .warm import METHOD as WARM_METHOD
from .warm import median, warm_prefills

GPU_KEYS = ("h2d_gbps", "vram_budget", "vram_hit_rate", "bytes_copied_to_device_per_token", "copy_bound_tok_s",
            "hbm_gbps", "kernel_bound_tok_s")
PREDICTOR_KEYS = ("predictor_precision", "predictor_recall")
# dense weights and activations: auto = the engine's default for the device; bfloat16 on CPU keeps
# a bf16 store's dense part as stored (half the bytes of a float32 copy for a decode step to read)
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}

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
    direct = direct and getattr(store, "direct_io", None) is not False  # GGUF extents: buffered
    with Reader(nthreads=io_threads, direct=direct) as reader:
        fids = {p: reader.open(str(p)) for p in {f for l in store.layers for f, *_ in store.record_reads(l, 0, False)}}
        cache = drop_page_cache()[1] if drop else "kept"
        if not drop or cache != "dropped":
            cache = _evict(reader, fids.values()) if cache == "kept" else cache
        done, t0 = 0, time.perf_counter()
        for i in range(0, len(keys), per_batch):
            batch = keys[i:i + per_batch]
            reqs = [(fids[f], off, n, buf.address + j * size + at, None) for j, (l, e) in enumerate(batch)
                    for f, off, n, at, _ in store.record_reads(l, e, False)]
            reader.read(reqs)
            done += sum(r[2] for r in reqs)
            if done >= max_bytes or time.perf_counter() - t0 >= max_seconds:
                break
        seconds = time.perf_counter() - t0
        _evict(reader, fids.values())
    return {"gbps": done / seconds / 1e9, "bytes": done, "seconds": seconds, "page_cache": cache,
            "direct_io": direct, "threads": io_threads, "records_per_batch": per_batch}


def peak_rss_bytes() -> int | None:
    """The process's peak resident set so far (Linux: ru_maxrss in KiB)."""
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return None


def _decode(engine, logits, n: int, temp: float = 0.0, seed: int = 0, progress=NO_PROGRESS) -> tuple[float, list[float]]:
    """n decode steps, greedy (temp <= 0) or sampled from the full distribution with a seeded
    generator (random-weight stores fall into greedy fixed points that would hide the pager)."""
    from ..runtime import pipelined
    from ..runtime.sampling import Sampler, SamplingParams
    sample = Sampler(SamplingParams(temperature=temp, top_k=0, top_p=1.0, min_p=0.0, seed=seed))
    if not pipelined.why_not(engine, sample):  # as generate.tokens decodes: the next step queued first
        return _decode_pipelined(engine, logits, n, sample, progress)
    times = []
    for _ in range(n):
        tok = sample(logits, engine.tokens)  # temp <= 0: argmax
        t0 = time.perf_counter()
        logits = engine.forward([tok], last_only=True)[-1]
        times.append(time.perf_counter() - t0)
        progress.advance()
    return sum(times), times


def _pipelined_note(engine, temp: float) -> str:
    from ..runtime.pipelined import why_not
    from ..runtime.sampling import Sampler, SamplingParams
    return why_not(engine, Sampler(SamplingParams(temperature=temp, top_k=0, top_p=1.0, min_p=0.0))) or "on"


def _decode_pipelined(engine, logits, n: int, sample, progress) -> tuple[float, list[float]]:
    """n steps pipelined by one token (runtime/pipelined.py): the wall time from the first token
    (picked on the host from the prefill's logits, outside the clock as in the unpipelined loop)
    to the n-th step's token read (the host's sampling and settling included; the speculative
    step left queued at the end is waited for outside it)."""
    from ..runtime.pipelined import Pipeline
    pipe = Pipeline.of(engine)  # its buffers made and its kernels loaded before the clock starts
    times, gen, t0, last = [], pipe.tokens(logits, sample), None, None
    for i, _ in enumerate(gen):
        now = time.perf_counter()
        if i:
            times.append(now - last)
            progress.advance()
        else:
            t0 = now
        last = now
        if i == n:
            break
    gen.close()
    return last - t0, times


def _rate(hits: int, n: int) -> float | None:
    return hits / n if n else None


def cuda_bandwidths(device, nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Pinned host->device copy and device-to-device copy bandwidth (GB/s; the latter counts
    the bytes read and written), best of `repeats`, timed with CUDA events."""
    from ..pager.tiers import CudaCopies, event_times
    copies = CudaCopies(device)
    host = copies.host_memory(nbytes)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev2 = torch.empty_like(dev)

    def best(fn, moved):
        return moved / min(event_times(fn, repeats)) / 1e9
    h2d = best(lambda: dev.copy_(host, non_blocking=True), nbytes)
    d2d = best(lambda: dev2.copy_(dev), 2 * nbytes)
    del dev, dev2
    copies.close()
    return {"h2d_gbps": h2d, "hbm_gbps": d2d, "bytes": nbytes}


def active_bytes_per_token(store, k: int | None = None, dense_itemsize: int | None = None) -> int:
    """Bytes of weights one decode token reads: the dense part less the embedding table (one row
    is read), plus k (default top_k) expert records per MoE layer. dense_itemsize: bytes per dense
    value as the engine holds them (CUDA engines cast float tensors to bf16: 2), else as stored."""
    from safetensors import safe_open
    cfg = store.config
    if getattr(store, "meta", None) is not None:  # a GGUF file: its tensor infos
        return store.dense_bytes_per_token() + len(store.layers) * (k or cfg.top_k) * store.record_bytes
    dense = 0
    with safe_open(str(store.path / "dense.safetensors"), "pt") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            dt = sl.get_dtype()
            size = dense_itemsize if dense_itemsize and dt in ("F32", "F16", "BF16", "F64") else _ITEMSIZE.get(dt, 4)
            n = math.prod(sl.get_shape()) * size
            if name == "embed.weight" and not cfg.tie_word_embeddings:
                n //= cfg.vocab_size
            dense += n
    return dense + len(store.layers) * (k or cfg.top_k) * store.layout.size


_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1}


def _compute_bound(store, device, ids, tokens, verify, backend, temp, seed, experts_per_token=None,
                   decode_graph="auto", progress=NO_PROGRESS, dense_quant="auto", dtype=None) -> dict:
    from ..runtime.engine import Engine
    need = store.expert_bytes
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
        fits, where = need <= free * 0.8, f"80% of the free VRAM ({format_size(free)})"
        budgets = dict(vram_budget=need, ram_budget=0)
    else:
        fits, where = need <= available_ram() // 2, f"half the free RAM ({format_size(available_ram())} free)"
        budgets = dict(ram_budget=need)
    if not fits:
        return {"compute_bound_tok_s": None, "compute_bound_prefill_tok_s": None,
                "compute_bound_reason": f"experts ({format_size(need)}) do not fit in {where}"}
    progress.stage("compute bound: loading every expert", total=len(store.layers))
    eng = Engine(store, device=device, n_ctx=len(ids) + tokens + 8, verify=verify, backend=backend, prefetch="off",
                 experts_per_token=experts_per_token, decode_graph=decode_graph, dense_quant=dense_quant, dtype=dtype,
                 **budgets)
    try:
        for l, info in store.layers.items():
            eng.pager.acquire(l, list(range(info.experts)))
            progress.advance()
        progress.stage(f"compute bound: prefill {len(ids)} tokens")
        eng.forward(ids, last_only=True)  # warm: lazy kernel loading, allocator growth, cuBLAS plans
        eng.reset()
        before = eng.pager.stats.snapshot()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = eng.forward(ids, last_only=True)[-1]
        prefill = time.perf_counter() - t0
        progress.stage("compute bound: decode", total=tokens)
        secs, _ = _decode(eng, logits, tokens, temp, seed, progress)
        assert eng.pager.stats.delta(before)["misses"] == 0
        launches = decode_launches(eng, logits)
    finally:
        eng.close()
    return {"compute_bound_tok_s": tokens / secs, "compute_bound_prefill_tok_s": len(ids) / prefill,
            "compute_bound_launches": launches,
            "compute_bound_reason": f"measured: every expert resident ({'VRAM' if device == 'cuda' else 'RAM'}), "
                                    "same prompt and decode"}


def run_bench(store_path, device: str = "cpu", ram_budget=None, policy: str = "auto", tokens: int = 32,
              prompt_tokens: int = 512, direct_io: bool | None = None, drop_caches: bool = False,
              verify: bool = True, io_threads: int = 4, backend: str | None = None,
              compute_bound: bool = True, temp: float = 1.0, seed: int = 0, save_trace=None,
              vram_budget=None, prefetch: str = "auto", prefetch_depth: int | None = None, host_compute: str = "auto",
              n_cpu_moe: int = 0, experts_per_token: int | None = None, decode_graph: str = "auto",
              dtype: str = "auto", progress=NO_PROGRESS, dense_quant: str = "auto", depth: int | None = None) -> dict:
    from ..pager.belady import belady
    from ..pager.pager import default_direct_io
    from ..pager.stats import COUNTERS
    from ..pager.trace import RoutingTrace
    from ..runtime.dense_quant import stored_bytes
    from ..runtime.engine import Engine, resolve_device
    from ..store.model import open_model

    dev = resolve_device(device)  # a clear error before any work
    cuda = dev.type == "cuda"
    store = open_model(store_path)
    if tokens < 1 or prompt_tokens < 1:
        raise ValueError("--tokens and --prompt-tokens must be at least 1")
    if depth is not None and depth < 0:
        raise ValueError(f"--depth must be at least 0, not {depth}")
    direct_io = default_direct_io(store.expert_bytes + stored_bytes(store), available_ram()) if direct_io is None else direct_io
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    torch_dtype = DTYPES[dtype]
    notes = []
    progress.stage("disk bandwidth")
    disk = disk_bandwidth(store, direct=direct_io, drop=drop_caches, io_threads=io_threads)
    if disk["page_cache"] not in ("dropped", "evicted"):
        notes.append(f"disk bandwidth measured with the page cache {disk['page_cache']}")
    bw = cuda_bandwidths(dev) if cuda else {"h2d_gbps": None, "hbm_gbps": None}

    progress.stage("loading the model")
    eng = Engine(store, device=device, ram_budget=ram_budget, vram_budget=vram_budget,
                 policy=policy, io_threads=io_threads, direct_io=direct_io, verify=verify, backend=backend,
                 n_ctx=max(prompt_tokens, depth or 1) + tokens + 8, prefetch=prefetch, prefetch_depth=prefetch_depth,
                 host_compute=host_compute, n_cpu_moe=n_cpu_moe, experts_per_token=experts_per_token,
                 decode_graph=decode_graph, dense_quant=dense_quant, dtype=torch_dtype)
    k, act_dtype = eng.config.top_k, str(eng.dtype).removeprefix("torch.")
    p = eng.pager
    trace = RoutingTrace()
    eng.record(trace)
    _evict(p.reader, p.fids.values())
    ids = prompt_ids(eng.tokenizer, prompt_tokens, store.config.vocab_size)
    try:
        s0 = p.stats.snapshot()
        progress.stage(f"prefill {len(ids)} tokens")
        t0 = time.perf_counter()
        logits = eng.forward(ids, last_only=True)[-1]
        ttft = time.perf_counter() - t0
        s1 = p.stats.snapshot()
        mark = len(trace)
        progress.stage("decode", total=tokens)
        decode_s, token_s = _decode(eng, logits, tokens, temp, seed, progress)
        dec, pre = p.stats.delta(s1), {k: s1[k] - s0[k] for k in COUNTERS}
        pred = eng.predictor.snapshot() if eng.predictor is not None else None
        host_mode = eng.host_compute.mode
        graph = {"decode_graph": "off" if eng.fast is None else eng.fast.mode,
                 "decode_graph_note": eng.decode_graph_reason if eng.fast is None or not eng.fast.why_not
                 else eng.fast.why_not,
                 # steps redone layer by layer from a missing expert (n_cpu_moe layers never miss)
                 "decode_graph_fallbacks": None if eng.fast is None else eng.fast.fallbacks,
                 # "on", or why the decode loop was not pipelined by one token (runtime/pipelined.py)
                 "decode_pipelined": _pipelined_note(eng, temp),
                 # MoE layers whose experts the host handles between replays (runtime/hybrid_decode.py)
                 "decode_graph_cut_layers": None if eng.fast is None else len(getattr(eng.fast, "cpu", ()))}
        fused = getattr(eng.fast, "fused", None)  # n_cpu_moe tokens as one graph + one host call (runtime/hybrid_token.py)
        if eng.fast is not None and hasattr(eng.fast, "fused_why"):
            graph["decode_fused_tokens"] = 0 if fused is None else fused.tokens
            graph["decode_fused_note"] = eng.fast.fused_why
        cl = eng.cpu_layers
        if cl is not None:  # n_cpu_moe: the measured costs and what went up to the GPU (runtime/cpu_layers.py)
            graph["n_cpu_moe_split"] = {"cpu_s": cl.cpu_s, "copy_s": cl.copy_s, "cpu_o": cl.cpu_o, "cpu_alone": cl.alone, "decode_plan": cl.plan_of(k), "slice_s": cl.cut_s,
                                        "decode_experts_on_gpu": cl.split_up, "prefill_experts_on_gpu": cl.copied_up}
        hc = eng.host_compute
        if hc.mode != "off":  # dynamic tiers: the costs the copy-or-compute split used (runtime/host_compute.py)
            graph["host_compute_costs"] = {"cpu_s": hc.cpu_s, "cpu_o": hc.cpu_o, "copy_s": hc.copy_s}
        eng.record(None)
        if depth is not None:  # the decode again, from `depth` tokens of context (llama-bench's way)
            graph["decode_at_depth"] = decode_at_depth(eng, ids, depth, tokens, temp, seed, progress)
        warm = warm_prefills(eng, ids)  # before the profiled steps below: bench/warm.py says why
        graph.update(decode_launches(eng, logits))
        # the same after torch.profiler ran (what the warm figure was before issue 9 moved it)
        after = warm_prefills(eng, ids, reps=3) if cuda else []
    finally:
        eng.record(None)
        eng.close()
    capacity, host_capacity, size, pol = p.capacity, p.host_capacity, p.record_size, p.policy
    preloaded = p.stats.preloaded
    peak_rss = peak_rss_bytes()  # before the compute-bound engine below adds its own
    dense_resident = dense_bytes({k: w for k, w in eng.model.w.items() if w.device.type == "cpu"})
    dense_mode = eng.dense_quant
    kv_bytes = 2 * eng.kv.k.numel() * eng.kv.k.element_size()
    total_records = sum(l.experts for l in store.layers.values())
    del eng, p
    gc.collect()

    if save_trace:  # e.g. STORE/routing_trace.npz: a rerun with --policy belady then replays this run
        trace.meta = {"tool": "flashmoe bench", "capacity": capacity, "policy": policy, "temp": temp, "seed": seed,
                      "prompt_tokens": len(ids), "tokens": tokens}
        trace.save(save_trace)
    progress.stage("belady on the recorded requests")
    reqs = trace.request_keys()
    opt = belady(reqs, capacity + host_capacity)
    sizes = [len(r) for r in reqs]
    n_dec, n_pre = dec["hits"] + dec["misses"], pre["hits"] + pre["misses"]
    run_hits = pre["hits"] + dec["hits"]
    hit_rate_run = _rate(run_hits, n_pre + n_dec)
    decode_tok_s = tokens / decode_s
    read_per_token = dec["bytes_read"] / tokens
    copied_per_token = dec["bytes_copied"] / tokens
    io_bound = disk["gbps"] * 1e9 / read_per_token if read_per_token else None
    copy_bound = bw["h2d_gbps"] * 1e9 / copied_per_token if cuda and copied_per_token else None
    if io_bound is None:
        notes.append("nothing read from disk while decoding: the run is not I/O bound (io_bound_tok_s null)")
    if preloaded:
        notes.append(f"{preloaded} records preloaded by the policy at start are not counted as misses; "
                     "belady starts from an empty pool")
    if not direct_io:
        notes.append("buffered reads: records evicted from the tiers may come back from the OS page cache "
                     "(faster than the disk bandwidth measured cold)")
    if not cuda:
        notes.append("GPU keys (" + ", ".join(GPU_KEYS) + ") are null on a CPU run")
    if pred is None:
        notes.append("prefetch off: no predictor figures")
    else:
        notes.append("prefetched records count as hits when their layer asks for them; belady_hit_rate is the "
                     "optimum without prefetch, so hit_rate_vs_belady can exceed 1")

    tiers = {"ram": {"hit_rate": _rate(dec["device_hits"], n_dec), "hits": dec["device_hits"],
                     "budget": capacity * size, "records": capacity}, "vram": None}
    if cuda:
        tiers = {"vram": {"hit_rate": _rate(dec["device_hits"], n_dec), "hits": dec["device_hits"],
                          "budget": capacity * size, "records": capacity},
                 "ram": {"hit_rate": _rate(dec["host_hits"], n_dec), "hits": dec["host_hits"],
                         "computed_on_cpu": dec["host_computed"], "budget": host_capacity * size,
                         "records": host_capacity}}
    tiers["disk"] = {"misses": dec["misses"], "miss_rate": _rate(dec["misses"], n_dec)}
    asked = parse_size(vram_budget if cuda else ram_budget, store.expert_bytes)
    budget_note = (f"{'VRAM' if cuda else 'RAM'} budget {format_size(asked) if asked is not None else 'default'} "
                   f"holds {capacity} whole records of {format_size(size)} = {format_size(capacity * size)}"
                   + (f" ({format_size(asked - capacity * size)} of it unused)" if asked and asked > capacity * size else ""))
    notes.append(budget_note)
    result = {
        "store": str(store.path), "architecture": store.architecture, "quant": store.quant,
        "source": store.manifest.get("source", {}).get("type"), "like": store.manifest.get("source", {}).get("like"),
        "moe_layers": len(store.layers), "record_bytes": size, "expert_bytes": store.expert_bytes,
        "dense_bytes": getattr(store, "dense_bytes", None) or (store.path / "dense.safetensors").stat().st_size,
        "device": device, "backend": None, "policy": policy, "policy_note": getattr(pol, "note", "") or None,
        "ram_budget": (host_capacity if cuda else capacity) * size,
        "capacity_records": capacity, "host_capacity_records": host_capacity, "total_records": total_records,
        "budget_requested": asked, "budget_note": budget_note,
        "peak_rss_bytes": peak_rss, "dense_resident_bytes": dense_resident, "dense_quant": dense_mode, "kv_cache_bytes": kv_bytes,
        "rss_overhead_bytes": peak_rss - dense_resident - (0 if cuda else capacity * size) - (0 if cuda else kv_bytes)
        if peak_rss else None,
        "dtype": act_dtype, "direct_io": direct_io, "verify": verify, "drop_caches": drop_caches, "io_threads": io_threads,
        "prompt_tokens": len(ids), "tokens": tokens, "temp": temp, "seed": seed, "experts_per_token": k,
        "ttft_s": ttft, "prefill_tok_s": len(ids) / ttft, "prefill_warm_tok_s": median(warm),
        "prefill_warm_tok_s_all": warm, "prefill_warm_method": WARM_METHOD,
        "prefill_warm_after_profiler_tok_s": median(after), "decode_tok_s": decode_tok_s,
        "decode_token_ms": [round(t * 1e3, 3) for t in token_s],
        "hit_rate": _rate(dec["hits"], n_dec), "hit_rate_prefill": _rate(pre["hits"], n_pre),
        "hit_rate_run": hit_rate_run, "tiers": tiers,
        "bytes_read_per_token": read_per_token, "missed_bytes_per_token": dec["misses"] * size / tokens,
        "stall_ms_per_token": dec["read_seconds"] * 1e3 / tokens,
        "prefill_bytes_read": pre["bytes_read"], "prefill_stall_s": pre["read_seconds"],
        "disk_bandwidth_gbps": disk["gbps"], "disk": disk,
        "io_bound_tok_s": io_bound, "io_efficiency": decode_tok_s / io_bound if io_bound else None,
        "belady_hit_rate": opt.hit_rate, "belady_hit_rate_decode": opt.hit_rate_over(mark, None, sizes),
        "belady_capacity_records": capacity + host_capacity,
        "hit_rate_vs_belady": hit_rate_run / opt.hit_rate if opt.hit_rate and hit_rate_run is not None else None,
        "requests": len(reqs),
        "prefetch": prefetch, "prefetch_depth": prefetch_depth, "host_compute": host_mode, "n_cpu_moe": n_cpu_moe,
        "prefetch_stats": {k: dec[k] for k in ("prefetch_reads", "prefetch_copies", "prefetch_used",
                                                "prefetch_cancelled", "prefetch_wasted")},
        "predictor_precision": pred["precision"] if pred else None,
        "predictor_recall": pred["recall"] if pred else None, "predictor": pred,
        "h2d_gbps": bw["h2d_gbps"], "hbm_gbps": bw["hbm_gbps"],
        "vram_budget": capacity * size if cuda else None,
        "vram_hit_rate": tiers["vram"]["hit_rate"] if cuda else None,
        "bytes_copied_to_device_per_token": copied_per_token if cuda else None,
        "copy_bound_tok_s": copy_bound, "kernel_bound_tok_s": None,
        **graph,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "ram_free": available_ram(), "load_avg_1m": os.getloadavg()[0],
                    "gpu": torch.cuda.get_device_name(dev) if cuda else None},
        "notes": notes,
    }
    from .. import kernels
    result["backend"] = kernels.select(dev.type, backend).name
    if cuda:
        result["active_bytes_per_token"] = active = active_bytes_per_token(store, k, dense_itemsize=2)  # bf16 dense
        # hbm_gbps counts the bytes a copy reads and writes: the rate HBM sustains, all of it
        # reads in a decode step (half of it, as before, understated the bound 2x)
        result["kernel_bound_tok_s"] = kb = bw["hbm_gbps"] * 1e9 / active
        result["decode_vs_kernel_bound"] = decode_tok_s / kb
    if compute_bound:
        result.update(_compute_bound(store, device, ids, tokens, verify, backend, temp, seed, k, decode_graph,
                                     progress, dense_quant, torch_dtype))
    else:
        result.update(compute_bound_tok_s=None, compute_bound_prefill_tok_s=None,
                      compute_bound_reason="skipped (compute_bound=False)")
    cb = result["compute_bound_tok_s"]
    result["compute_efficiency"] = decode_tok_s / cb if cb else None
    if cb and result["kernel_bound_tok_s"]:
        result["compute_bound_vs_kernel_bound"] = cb / result["kernel_bound_tok_s"]
    return result


def run_profile(store_path, prompts: list[str] | None = None, n: int = 64, ram_budget=None, policy: str = "auto",
                trace_path=None, device: str = "cpu", verify: bool = True, temp: float = 0.0, seed: int = 0,
                progress=NO_PROGRESS) -> dict:
    """Generate n tokens after each prompt (greedy, or sampled at temp with a fixed seed) with routing recorded; writes routing_stats.json
    into the store folder (atomic replace) and the routing trace (default STORE/routing_trace.npz)."""
    from ..pager.trace import TRACE_FILE, RoutingTrace, write_routing_stats
    from ..runtime.engine import Engine

    prompts = [p for p in (prompts or PROMPTS) if p.strip()]
    if not prompts:
        raise ValueError("no prompts to profile")
    progress.stage("loading the model")
    eng = Engine(store_path, device=device, ram_budget=ram_budget, policy=policy, verify=verify, n_ctx=2048)
    store, cfg = eng.store, eng.config
    trace = RoutingTrace()
    eng.record(trace)
    generated = 0
    try:
        progress.stage("profiling prompts", total=len(prompts) * n)
        for text in prompts:
            eng.reset()
            ids = [i for i in eng.tokenizer.encode(text, add_bos=True) if i < cfg.vocab_size][:2048 - n - 1] or [0]
            logits = eng.forward(ids, last_only=True)[-1]
            _decode(eng, logits, n, temp, seed, progress)
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
