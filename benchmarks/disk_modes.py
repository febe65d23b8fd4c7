"""Cold read bandwidth of a store's expert records: O_DIRECT against buffered reads, for a few
reader thread counts, each after dropping the page cache (root) or evicting the files. Prints
JSON. This is what `default_direct_io()` in pager/pager.py is chosen from, per platform.

    python benchmarks/disk_modes.py STORE [--threads 4 8 16]
"""
import argparse
import json
import platform

from flashmoe_plugin.bench.store import disk_bandwidth
from flashmoe_plugin.store.format import Store


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--threads", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--max-bytes", type=float, default=4e9)
    args = ap.parse_args()
    store = Store.open(args.store)
    rows = [disk_bandwidth(store, direct=direct, drop=True, io_threads=t, max_bytes=int(args.max_bytes), max_seconds=6)
            for t in args.threads for direct in (True, False)]
    best = max(rows, key=lambda r: r["gbps"])
    print(json.dumps({"platform": platform.platform(), "record_bytes": store.layout.size, "runs": rows,
                      "best": {"direct_io": best["direct_io"], "threads": best["threads"], "gbps": best["gbps"]}},
                     indent=1))


if __name__ == "__main__":
    main()
