"""Issue 10's hybrid rows in one process (torch.compile and the CUDA context paid once): `flashmoe
bench` (run_bench) on one store for several --n-cpu-moe values, and A/B variants of CpuLayers.plan:
",cpu" every CPU-layer expert of a decode token on the CPU, ",whole" the share cut at whole experts
only (records still sliced), ",noslice" records never sliced (store/slices.py off: as before h10b).

    python3 benchmarks/h200_hybrid_rows.py STORE OUT.json N[,cpu|,whole|,noslice] ...   e.g.  /tmp/m12 r.json 9,noslice 9 12

DEVICE=cpu tries it on the CPU twin. Prints one line per row; writes {row: run_bench's dict} to OUT.json after every row."""
from __future__ import annotations

import json
import os
import sys
import time

from flashmoe_plugin.bench.store import run_bench
from flashmoe_plugin.runtime.host_compute import CpuLayers
from flashmoe_plugin.store import slices


def main(store: str, out: str, rows: list[str]):
    plan, smallest = CpuLayers.plan, slices.SMALLEST
    doc = {}
    for row in rows:
        n, _, mode = row.partition(",")
        if mode == "cpu":
            CpuLayers.plan = lambda self, k, q=1: k * q
        if mode == "whole":
            CpuLayers.plan = lambda self, k, q=1: q * plan(self, k, 1)
        if mode == "noslice":
            slices.SMALLEST = 1 << 40
        t0 = time.time()
        try:
            r = run_bench(store, device=os.environ.get("DEVICE", "cuda"), tokens=32, prompt_tokens=512, io_threads=8, compute_bound=False,
                          n_cpu_moe=int(n))
        except Exception as e:  # noqa: BLE001 - report and go on with the next row
            print(row, "FAILED", type(e).__name__, e, flush=True)
            doc[row] = {"error": f"{type(e).__name__}: {e}"}
            continue
        finally:
            CpuLayers.plan, slices.SMALLEST = plan, smallest
        doc[row] = r
        print(f"n_cpu_moe {row}: decode {r['decode_tok_s']:.2f} tok/s, prefill cold {r['prefill_tok_s']:.0f} warm "
              f"{r['prefill_warm_tok_s']:.0f}, host {r.get('host_ms_per_token')} ms/token, graph {r['decode_graph']} "
              f"fallbacks {r['decode_graph_fallbacks']}, split {r.get('n_cpu_moe_split')} ({time.time() - t0:.0f} s)",
              flush=True)
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
