"""fm_moe's decode on two Mixtral-shaped experts: the one-pass path against the two-phase one (issue 10).

    python benchmarks/cpu_moe1.py [--json FILE] [--total-gib 1.2] [--rounds 3] [--tasks 0,2,4,8]

One token through k = 2 experts of H 4096 x I 14336 (q4 by default; the --n-cpu-moe rows' C call
per CPU layer), records cycled over >= --total-gib of distinct memory (no cache figure). Each
--tasks value is `set_moe1(n)` (0: the two-phase path of main before session 11: gate/up, prep,
down with a barrier after each; n > 0: csrc/cpu/fm_moe1.c with ~n tasks a thread), all timed in
interleaved rounds (0 2 4 8 0 2 4 8 ...) in one process, the median over rounds of each round's
median pass. GB/s = the two experts' record bytes / time, beside the machine's read rate (torch
sum over 256 MiB, best of 5, at the start and the end). Run it alone (the box lock's `quiet`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

GiB, MiB = 1 << 30, 1 << 20


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--label", default="")
    ap.add_argument("--total-gib", type=float, default=1.2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--tasks", default="0,2,4,8")
    ap.add_argument("--fmt", default="q4")
    ap.add_argument("--threads", type=int, default=0, help="kernel threads (default: the pool's)")
    a = ap.parse_args(argv)
    from flashmoe_plugin.bench.kernels import _module, _pass_times, _records, _ref_layer, mem_bandwidth
    from flashmoe_plugin.store.layout import RecordLayout

    K = _module()
    if a.threads:
        K.set_num_threads(a.threads)
    H, I, k = 4096, 14336, 2
    layout = RecordLayout.build(a.fmt, H, I)
    spec = K.ExpertSpec.from_layout(layout)
    count = max(2 * k, math.ceil(a.total_gib * GiB / layout.size) // k * k)
    torch.manual_seed(0)
    recs = _records(layout, count)
    groups = [recs[i * k:(i + 1) * k] for i in range(count // k)]
    x = torch.randn(1, H)
    wts = torch.softmax(torch.randn(k), 0)
    out = torch.zeros(1, H)
    tasks = [int(t) for t in a.tasks.split(",")]
    res = {"label": a.label, "threads": K.get_num_threads(), "isa": K.isa(), "fmt": a.fmt, "H": H, "I": I, "k": k,
           "distinct_gib": count * layout.size / GiB, "bytes_per_call": k * layout.size,
           "loadavg_start": os.getloadavg(), "mem_start": mem_bandwidth(256 * MiB)}
    ref = _ref_layer(x, groups[0], wts, layout)
    res["rel_err"] = {}
    for t in tasks:
        K.set_moe1(t)
        o = torch.zeros(1, H)
        K.moe(x, groups[0], wts, spec, o)
        res["rel_err"][str(t)] = (o.double() - ref).abs().max().item() / ref.abs().max().item()
    fn = lambda i: K.moe(x, groups[i], wts, spec, out)  # noqa: E731
    ms = {t: [] for t in tasks}
    for _ in range(a.rounds):
        for t in tasks:
            K.set_moe1(t)
            ms[t].append(statistics.median(_pass_times(fn, len(groups), a.passes)) * 1e3)
    K.set_moe1(4)
    res["mem_end"] = mem_bandwidth(256 * MiB)
    res["loadavg_end"] = os.getloadavg()
    read = max(res["mem_start"]["read_gbps"], res["mem_end"]["read_gbps"])
    res["cases"] = []
    for t in tasks:
        m = statistics.median(ms[t])
        gbps = k * layout.size / m / 1e6
        row = {"tasks_per_thread": t, "path": "two-phase" if t == 0 else "one-pass", "ms": ms[t], "ms_median": m,
               "gbps": gbps, "of_read": gbps / read}
        res["cases"].append(row)
        print(f"moe1={t}: {' '.join(f'{v:.3f}' for v in ms[t])} ms  median {m:.3f} ms = {gbps:.1f} GB/s "
              f"({gbps / read:.2f} of read {read:.1f})  err {res['rel_err'][str(t)]:.1e}", flush=True)
    base = statistics.median(ms[tasks[0]])
    for row in res["cases"]:
        row["speedup_vs_first"] = base / row["ms_median"]
    res["time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"threads {res['threads']} {res['isa']}, {res['distinct_gib']:.2f} GiB distinct, read "
          f"{res['mem_start']['read_gbps']:.1f} -> {res['mem_end']['read_gbps']:.1f} GB/s, load "
          f"{res['loadavg_start'][0]:.2f} -> {res['loadavg_end'][0]:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
