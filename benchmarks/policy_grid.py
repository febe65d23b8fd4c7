"""Grade the pager's replacement policies against Belady's MIN on recorded routing traces.

    python benchmarks/policy_grid.py --json benchmarks/results/devbox-policy-grid.json [--traces DIR]

Workloads (each trace recorded by the engine with every expert resident and prefetch off, so the
requests are exactly what the pager sees; `pager.belady.simulate` replays a policy with the
pager's hits, which tests/test_policies.py checks against the real pager):
- demo-decode / demo-prefill: the demo model (real routing, 8 layers x 32 experts, top-4);
  decode = 6 prompts, each prefilled then 64 tokens sampled at temperature 0.7, graded on the
  decode requests only (the cache warmed by the prefills); prefill = 16 distinct 64-token
  windows of English text prefilled back to back (a server's prompt stream), graded on all.
- synth-decode / synth-prefill: `flashmoe synth --like tiny --layers 32` (random routers: the
  synth stores' near-uniform, uncorrelated routing, with Mixtral's routing shape: 32 layers x 8
  experts, top-2), random-token prompts at temperature 1.0: decode = 4 prompts of 16 tokens, each
  then 32 decoded; prefill = 12 prompts of 64 tokens.
At each capacity (a fraction of all expert records) prefill requests larger than the capacity
are split into groups that fit, as Engine._experts does. On i.i.d. uniform routing no online
policy can beat capacity/records in expectation (each layer's residents at its visit sum to at
most the capacity), so the synth rows also carry that bound. Every row also carries a "static
oracle": the hit rate if the trace's capacity - top_k most used experts were always resident
(popularity known in hindsight, order unknown), a reference for what frequency alone can give.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from flashmoe_plugin.bench.store import PROMPTS
from flashmoe_plugin.pager.belady import belady, simulate
from flashmoe_plugin.pager.trace import RoutingTrace
from flashmoe_plugin.plugins import registry
from flashmoe_plugin.runtime.engine import Engine

FRACTIONS = (0.10, 0.25, 0.50, 0.75)
POLICIES = ("lru", "lfu", "fwlru", "lrfu", "auto")


def record(store, prompts: list[list[int]], decode: int, temp: float) -> RoutingTrace:
    from flashmoe_plugin.runtime.sampling import Sampler, SamplingParams
    eng = Engine(store, prefetch="off", n_ctx=4096)
    trace = RoutingTrace()
    eng.record(trace)
    for i, ids in enumerate(prompts):
        eng.reset()
        logits = eng.forward(ids, last_only=True)[-1]
        sample = Sampler(SamplingParams(temperature=temp, top_k=0, top_p=1.0, min_p=0.0, seed=i))
        for _ in range(decode):
            logits = eng.forward([sample(logits, eng.tokens)], last_only=True)[-1]
    eng.close()
    trace.meta = {"records": sum(l.experts for l in eng.store.layers.values()), "top_k": eng.config.top_k,
                  "layers": len(eng.store.layers), "experts": eng.config.num_experts}
    return trace


def workloads(tmp: Path, traces: Path | None = None):
    """(name, trace, graded_on) per workload; traces are read from / saved to `traces` if given."""
    from flashmoe_plugin.convert.synth import synth
    from flashmoe_plugin.demo import demo_model_path
    DEMO = demo_model_path()  # noqa: N806
    demo = Engine(DEMO, prefetch="off")
    tok = demo.tokenizer
    demo.close()
    text = (Path(DEMO).parent / "README.md").read_text()
    words = tok.encode(text, add_bos=False)
    windows = [words[i:i + 64] for i in range(0, 64 * 16, 64)]
    prompts = [tok.encode(p, add_bos=True) for p in PROMPTS]
    synth_store = synth(tmp / "synth32", like="tiny", layers=32, quant="q4")
    g = torch.Generator().manual_seed(0)
    rnd = lambda n, k: [torch.randint(3, 500, (n,), generator=g).tolist() for _ in range(k)]  # noqa: E731
    plan = {"demo-decode": (DEMO, prompts, 64, 0.7, "decode"), "demo-prefill": (DEMO, windows, 0, 0.7, "all"),
            "synth-decode": (synth_store, rnd(16, 4), 32, 1.0, "decode"),
            "synth-prefill": (synth_store, rnd(64, 12), 0, 1.0, "all")}
    for name, (store, ps, n, temp, over) in plan.items():
        path = traces / f"{name}.npz" if traces else None
        if path is not None and path.is_file():
            yield name, RoutingTrace.load(path), over
            continue
        t0 = time.perf_counter()
        trace = record(store, ps, n, temp)
        print(f"{name}: {len(trace)} requests recorded in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if path is not None:
            trace.save(path)
        yield name, trace, over


def split(requests, mask, capacity):
    """Prefill requests larger than the capacity become groups that fit (as the engine does)."""
    reqs, m = [], []
    for r, d in zip(requests, mask):
        for i in range(0, len(r), capacity):
            reqs.append(r[i:i + capacity])
            m.append(d)
    return reqs, m


def graded(result, reqs, mask) -> float:
    hits = sum(h for h, d in zip(result.hits_per_request, mask) if d)
    n = sum(len(r) for r, d in zip(reqs, mask) if d)
    return hits / n if n else 0.0


def static_oracle(reqs, mask, cap: int, k: int) -> float:
    """Hindsight frequencies: the hit rate of the graded requests if the cap - k experts they use
    most were always resident (k slots left for the request's others). What knowing each expert's
    popularity, but nothing of the order, gives."""
    from collections import Counter
    counts = Counter(key for r, d in zip(reqs, mask) if d for key in r)
    pinned = sum(c for _, c in counts.most_common(max(0, cap - k)))
    return pinned / max(1, sum(counts.values()))


def grade(trace: RoutingTrace, over: str, policies=POLICIES, fractions=FRACTIONS) -> list[dict]:
    total = trace.meta["records"]
    keys = trace.request_keys()
    dmask = trace.decode_mask() if over == "decode" else [True] * len(keys)
    rows = []
    for frac in fractions:
        cap = max(trace.meta["top_k"], int(frac * total))
        reqs, mask = split(keys, dmask, cap)
        best = graded(belady(reqs, cap), reqs, mask)
        row = {"fraction": frac, "capacity": cap, "belady": best, "online_bound_uniform": cap / total, "policies": {},
               "static_oracle": static_oracle(reqs, mask, cap, trace.meta["top_k"]) if over == "decode" else None}
        for name in policies:
            t0 = time.perf_counter()
            hr = graded(simulate(registry().policies[name](cap), reqs, cap), reqs, mask)
            row["policies"][name] = {"hit_rate": hr, "of_belady": hr / best if best else None,
                                     "sim_seconds": round(time.perf_counter() - t0, 3)}
        rows.append(row)
    return rows


def table(results: dict) -> str:
    pols = list(next(iter(results.values()))["grid"][0]["policies"])
    out = ["| workload | capacity | Belady | static oracle | " + " | ".join(pols) + " |", "|---" * (4 + len(pols)) + "|"]
    for name, w in results.items():
        for row in w["grid"]:
            cells = [f"{p['hit_rate']:.3f}" + (f" ({p['of_belady']:.2f})" if p["of_belady"] is not None else "")
                     for p in row["policies"].values()]
            bound = f" (uniform bound {row['online_bound_uniform']:.3f})" if name.startswith("synth") else ""
            out.append(f"| {name} | {row['fraction']:.0%} ({row['capacity']}) | {row['belady']:.3f}{bound} | "
                       + (f"{row['static_oracle']:.3f} | " if row["static_oracle"] is not None else "n/a | ")
                       + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--traces", type=Path, help="a folder: reuse the traces saved there, save new ones there")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and immune to a loaded machine's barriers
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if a.traces:
            a.traces.mkdir(parents=True, exist_ok=True)
        for name, trace, over in workloads(Path(tmp), a.traces):
            results[name] = {"graded_on": over, "requests": len(trace), **trace.meta,
                             "grid": grade(trace, over, a.policies.split(","))}
            print(name, "done", file=sys.stderr)
    doc = {"meta": {"what": __doc__.split("\n")[0], "command": " ".join(["python"] + sys.argv),
                    "machine": platform.node(), "date": time.strftime("%Y-%m-%d")}, "workloads": results}
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
