"""O_DIRECT against buffered reads under memory pressure: `flashmoe bench` on a store larger than a
memory cgroup, with an expert budget that leaves little room, both ways, then without the cgroup.

    python3 benchmarks/io_pressure.py STORE --limit 2G --ram-budget 500M --json OUT.json

Buffered reads put every record into the page cache as well as into the pager's slots (double
caching); under a cgroup that cache is charged to the same limit, and the kernel reclaims it while
the reads go on. O_DIRECT reads bypass it. Each run drops the page cache first (where permitted).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rival import flashmoe, make_cgroup, sh  # noqa: E402

from flashmoe_plugin.sizes import parse_size  # noqa: E402

KEYS = ("decode_tok_s", "ttft_s", "hit_rate", "bytes_read_per_token", "disk_bandwidth_gbps", "io_bound_tok_s",
        "io_efficiency", "stall_ms_per_token", "peak_rss_bytes", "capacity_records")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--limit", default="2G")
    ap.add_argument("--ram-budget", default="500M")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    limit = parse_size(a.limit)
    cg, how = make_cgroup("flashmoe-io-pressure", limit)
    runs = {}
    for where in (["cgroup"] if cg else []) + ["no cgroup"]:
        for dio in ("on", "off"):
            cmd = flashmoe() + ["bench", a.store, "--json", "--ram-budget", a.ram_budget, "--direct-io", dio,
                                "--tokens", str(a.tokens), "--prompt-tokens", "16", "--no-compute-bound", "--drop-caches"]
            t0 = time.time()
            r = sh(cmd, cgroup=cg if where == "cgroup" else None, timeout=1200)
            name = f"{where}, O_DIRECT {dio}"
            runs[name] = {k: json.loads(r.stdout).get(k) for k in KEYS} if r.returncode == 0 else \
                {"error": r.stderr[-800:]}
            runs[name]["seconds"] = round(time.time() - t0, 1)
            print(name, runs[name], file=sys.stderr, flush=True)
    doc = {"store": a.store, "limit": limit, "ram_budget": a.ram_budget, "cgroup": how, "runs": runs,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
