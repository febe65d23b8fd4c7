"""Decode tok/s at a given context length, per family, on few-layer `flashmoe synth --like` stores.

    python benchmarks/context_decode.py --like deepseek-v3 --layers 2 --out result.json

For each store: a real 128-token prefill (timed: TTFT), `--warm` untimed decode steps, then
`--tokens` timed greedy decode steps at context 128. For the longer contexts (default 2048) the
cache positions [128, N) are filled with the prefill's own cache repeated (the K/V, or for MLA
the latent and rotary key, of real tokens) instead of an N-token prefill, which at these widths
takes minutes on 2 cores; attention reads every cached position whatever its values, so the
decode step costs what it would after a real prefill (only routing may differ, and synth
routing is random anyway). Dense weights are kept in bf16 (`Engine(dtype=torch.bfloat16)`) so
that DeepSeek-V3's 129k x 7168 embedding and head fit beside the experts in the box's RAM.

The stores have a few layers (the disk and RAM are small): tok/s is for those layers plus the
embedding and the head, not for the whole model. What the figures show is how the decode step
grows with the context on each family's attention (GQA, sliding window + sinks, MLA latent).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch


def fill_context(eng, n_real: int, n: int):
    """Cache positions [n_real, n) <- copies of [0, n_real); the engine then stands at n."""
    for cache in (eng.kv.k, eng.kv.v):
        for start in range(n_real, n, n_real):
            m = min(n_real, n - start)
            cache[:, start:start + m] = cache[:, :m]
    eng.tokens = (eng.tokens * (n // n_real + 1))[:n]


def decode(eng, tok: int, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = eng.forward([tok], last_only=True)[-1]
        times.append(time.perf_counter() - t0)
        tok = int(logits.argmax())
    return times


def measure(store: Path, contexts: list[int], tokens: int, warm: int, threads: int, ram_budget=None) -> dict:
    from flashmoe_plugin.runtime.engine import Engine
    torch.set_num_threads(threads)
    n_real = min(contexts)
    eng = Engine(store, n_ctx=max(contexts) + warm + tokens + 1, dtype=torch.bfloat16, direct_io=False,
                 ram_budget=ram_budget)
    c = eng.config
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, c.vocab_size, (n_real,), generator=g).tolist()
    t0 = time.perf_counter()
    logits = eng.forward(prompt, last_only=True)[-1]
    ttft = time.perf_counter() - t0
    decode(eng, int(logits.argmax()), warm)
    base = list(eng.tokens[:n_real])
    rows = []
    for n in contexts:
        eng.tokens = list(base)
        fill_context(eng, n_real, n)
        before = eng.pager.stats.snapshot()
        times = decode(eng, base[-1], tokens)
        d = eng.pager.stats.delta(before)
        rows.append({"context": n, "tokens": tokens, "tok_s": tokens / sum(times),
                     "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                     "max_ms": 1e3 * max(times), "hit_rate": d["hit_rate"], "bytes_read": d["bytes_read"],
                     "read_stall_s": d["read_seconds"]})
    out = {"architecture": c.architecture, "layers": c.num_layers, "moe_layers": list(c.moe_layers),
           "experts": c.num_experts, "top_k": c.top_k, "record_bytes": eng.store.layout.size,
           "expert_bytes": eng.store.expert_bytes, "prefill_tokens": n_real, "ttft_s": ttft,
           "decode": rows}
    eng.close()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--like", required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--quant", default="q4")
    ap.add_argument("--contexts", default="128,2048")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ram-budget", default=None, help="expert bytes kept in RAM (e.g. 3G; default: the engine's)")
    ap.add_argument("--root", default="/tmp/flashmoe-context-decode")
    ap.add_argument("--keep", action="store_true", help="keep the synth store (default: delete it)")
    ap.add_argument("--out", required=True, help="JSON file; an existing one gains this family's entry")
    a = ap.parse_args(argv)
    store = Path(a.root) / f"{a.like}-{a.layers}l-{a.quant}"
    if not store.is_dir():
        subprocess.run(["flashmoe", "synth", "--like", a.like, "--layers",
                        str(a.layers), "--quant", a.quant, str(store)], check=True)
    try:
        res = measure(store, [int(x) for x in a.contexts.split(",")], a.tokens, a.warm, a.threads, a.ram_budget)
    finally:
        if not a.keep:
            shutil.rmtree(store, ignore_errors=True)
    res.update(like=a.like, ram_budget=a.ram_budget, quant=a.quant, store_layers=a.layers, threads=a.threads,
               loadavg=open("/proc/loadavg").read().split()[:3], machine=platform.machine(),
               cpus=os.cpu_count(), torch=torch.__version__)
    out = Path(a.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    doc["runs"][a.like] = res
    out.write_text(json.dumps(doc, indent=1) + "\n")
    for r in res["decode"]:
        print(f"{a.like}: context {r['context']}: {r['tok_s']:.3f} tok/s (median {r['median_ms']:.1f} ms)")


if __name__ == "__main__":
    main()
