"""The C kernels streaming expert records from 4 KiB pages against transparent huge pages (h11).

    python3 benchmarks/h11_huge_pages.py STORE OUT.json [RECORDS]

Copies RECORDS (default 24) expert records of the store's first layers into two regions of RAM,
one advised MADV_NOHUGEPAGE (4 KiB pages, what CpuLayers held before) and one MADV_HUGEPAGE
(io.aligned_empty(huge=True), what it holds now), both pinned beside a GPU as CpuLayers pins them,
then per region: the C kernels on a decode token's two experts (pairs no earlier call read, so
from RAM, not the L3), best and median ms of 3 passes over every pair, and a 16-thread torch sum
over the region (GB/s). Also the system's THP settings, the AnonHugePages each region got, the
load average and the CPU MHz."""
from __future__ import annotations

import ctypes
import json
import os
import statistics
import sys
import time

import torch

from flashmoe_plugin.io import HUGE_PAGE, aligned_empty
from flashmoe_plugin.kernels.cpu_backend import CpuBackend
from flashmoe_plugin.runtime.host_compute import physical_cores
from flashmoe_plugin.store.model import open_model


def anon_huge_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next((int(l.split()[1]) for l in f if l.startswith("AnonHugePages:")), -1)


def region(nbytes: int, huge: bool) -> torch.Tensor:
    if huge:
        return aligned_empty(nbytes, huge=True)
    t = aligned_empty(nbytes, align=HUGE_PAGE)
    libc = ctypes.CDLL(None)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.madvise(t.data_ptr(), nbytes // HUGE_PAGE * HUGE_PAGE, 15)  # MADV_NOHUGEPAGE
    return t


def main(store_path: str, out: str, n: int = 24):
    store = open_model(store_path)
    lay = store.layout_of(sorted(store.layers)[0])
    keys = [(l, e) for l in sorted(store.layers) for e in range(store.layers[l].experts)][:n]
    size = lay.size
    doc = {"records": len(keys), "record_bytes": size, "cpus": os.cpu_count(), "threads": physical_cores(),
           "load_avg_before": os.getloadavg()}
    for f in ("enabled", "defrag"):
        try:
            doc[f"thp_{f}"] = open(f"/sys/kernel/mm/transparent_hugepage/{f}").read().strip()
        except OSError as e:
            doc[f"thp_{f}"] = str(e)
    try:
        mhz = [float(l.split(":")[1]) for l in open("/proc/cpuinfo") if l.startswith("cpu MHz")]
        doc["cpu_mhz"] = [min(mhz), max(mhz)]
    except (OSError, ValueError):
        pass
    cuda = torch.cuda.is_available() and os.environ.get("DEVICE", "cuda") == "cuda"
    be = CpuBackend(physical_cores())
    be.set_spin_us(5000)
    x = torch.ones(1, lay.hidden)
    for mode in ("4k", "huge"):
        before = anon_huge_kb()
        t0 = time.perf_counter()
        mem = region(len(keys) * size, mode == "huge")
        if cuda:
            torch.cuda.cudart().cudaHostRegister(mem.data_ptr(), mem.numel(), 0)
        for i, (l, e) in enumerate(keys):
            rec = mem[i * size:(i + 1) * size]
            for f, off, nbytes, into, _ in store.record_reads(l, e, False):
                with open(f, "rb") as fh:
                    fh.seek(off)
                    fh.readinto(memoryview(rec[into:into + nbytes].numpy()))
        r = {"fill_s": round(time.perf_counter() - t0, 2), "anon_huge_mib": (anon_huge_kb() - before) // 1024}
        recs = [mem[i * size:(i + 1) * size] for i in range(len(keys))]
        pairs = [recs[i:i + 2] for i in range(0, len(recs) - 1, 2)]
        be.moe(x, pairs[0], [1.0, 1.0], lay)
        times = []
        for _ in range(3):
            for p in pairs:
                t = time.perf_counter()
                be.moe(x, p, [1.0, 1.0], lay)
                times.append(time.perf_counter() - t)
        r["two_experts_ms_best"] = round(min(times) * 1e3, 3)
        r["two_experts_ms_median"] = round(statistics.median(times) * 1e3, 3)
        r["c_kernels_gbps_median"] = round(2 * size / statistics.median(times) / 1e9, 1)
        if mode == "huge":  # the pool's size: every core, or one left to the host thread's other work
            for nt in sorted({physical_cores(), physical_cores() - 1, physical_cores() - 2} - {0}):
                be.set_num_threads(nt)
                be.moe(x, pairs[0], [1.0, 1.0], lay)
                tt = []
                for p in pairs * 2:
                    t = time.perf_counter()
                    be.moe(x, p, [1.0, 1.0], lay)
                    tt.append(time.perf_counter() - t)
                r[f"two_experts_ms_median_{nt}_threads"] = round(statistics.median(tt) * 1e3, 3)
            be.set_num_threads(physical_cores())
        f32 = mem[:mem.numel() // 4 * 4].view(torch.float32)
        torch.set_num_threads(physical_cores())
        f32.sum()
        best = min(_timed(f32.sum) for _ in range(3))
        r["torch_sum_gbps"] = round(f32.numel() * 4 / best / 1e9, 1)
        if cuda:
            torch.cuda.cudart().cudaHostUnregister(mem.data_ptr())
        del recs, pairs, f32, mem
        doc[mode] = r
        print(mode, r, flush=True)
    doc["load_avg_after"] = os.getloadavg()
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]))
