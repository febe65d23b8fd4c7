"""Fault soak: generate through the `faulty` storage reader at a seeded random fault rate and
compare every logit with a clean run; print JSON figures (faults injected by kind, retries,
requests that failed, tokens, whether every survived step matched the clean run bit for bit).

    python benchmarks/faults_soak.py [--store demo] [--tokens 200] [--rate 0.05] [--seed 1]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flashmoe_plugin.runtime.engine import Engine
from flashmoe_plugin.store.format import Store, StoreError


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=str(Path(__file__).parent.parent / "flashmoe_plugin" / "demo_model" / "store"))
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--records", type=int, default=12, help="tier-0 capacity in records (small: many reads)")
    a = ap.parse_args()
    store = Store.open(a.store)
    opts = dict(ram_budget=a.records * store.layout.size, prefetch="auto", io_threads=2)
    g = torch.Generator().manual_seed(a.seed)
    prompt = torch.randint(3, store.config.vocab_size, (16,), generator=g).tolist()
    steps = torch.randint(3, store.config.vocab_size, (a.tokens,), generator=g).tolist()

    clean = Engine(store, **opts)
    ref = [clean.forward(prompt)] + [clean.forward([t]) for t in steps]
    clean.close()

    eng = Engine(store, storage="faulty", storage_options={"faults": f"rate={a.rate},seed={a.seed}"}, **opts)
    t0, failed, matched, done = time.perf_counter(), 0, 0, 0
    for i, chunk in enumerate([prompt] + [[t] for t in steps]):
        while True:  # a failed request is simply asked again, as a client would
            try:
                out = eng.forward(chunk)
                break
            except StoreError:
                failed += 1
        done += 1
        matched += bool(torch.equal(out, ref[i]))
    st, reader = eng.pager.stats, eng.pager.reader
    eng.close()
    print(json.dumps({
        "store": a.store, "rate": a.rate, "seed": a.seed, "steps": done, "reads": sum(reader.reads.values()),
        "faults_injected": dict(reader.injected), "read_retries": st.read_retries,
        "read_failures": st.read_failures, "requests_failed_and_retried": failed,
        "steps_bit_identical_to_clean_run": matched, "seconds": round(time.perf_counter() - t0, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
