"""Issue 10's --n-cpu-moe rows, main's plan against the measured split (runtime/split_tuner.py), in
one process and one engine per configuration, so that the comparison is fair on a machine whose
figures move between calls (h10d, session 8).

    python3 benchmarks/h200_split_sweep.py STORE OUT.json SECONDS N:CONFIG[:c,c,...] ...
        e.g. /tmp/m32 r.json 150 24:main 24:new:16,12,8 32:new 32:main

CONFIG main: whole records, the share by the start-up cost model (main's CpuLayers.plan, tuner off);
new: the default (8 slices per Mixtral expert, the share by measured time). Per configuration one
engine; runs of a 512-token prompt and 32 decoded tokens (temp 1, seed 0, as `flashmoe bench`):
"first" (what `bench` measures: the engine's first decode, the tuner's descent included), "again"
(the same after eng.reset(), the tuner settled), then one run per forced share c listed (the
tuner off, CpuLayers.plan returning c). Each run carries tok/s, the warm prefill's tok/s, the
per-token ms, the plan and costs, and h200_hybrid_rows.py's host-time probe. Before the rows: the
host's RAM read bandwidth (torch sum over 4 GiB, all threads and the C pool's count) and the C
kernels alone (a token's two experts of the store's first layer, one call, best of 30) at the C
pool's thread counts. Runs are skipped once SECONDS (from the start) would be passed; OUT.json is
written after every run. DEVICE=cpu tries it on the CPU twin (the GPU-only parts skipped).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from h200_hybrid_rows import probed  # noqa: E402

from flashmoe_plugin.bench.store import _decode, prompt_ids  # noqa: E402
from flashmoe_plugin.runtime.cpu_layers import CpuLayers  # noqa: E402
from flashmoe_plugin.runtime.engine import Engine  # noqa: E402
from flashmoe_plugin.runtime.host_compute import physical_cores  # noqa: E402

PROMPT, TOKENS = 512, 32
T0 = time.time()


def ram_and_kernels(store_path: str) -> dict:
    """RAM read bandwidth (GB/s) by torch at a few thread counts, and the C kernels alone on a
    token's two experts (GB/s of record bytes) at the pool's thread counts."""
    from flashmoe_plugin.kernels.cpu_backend import CpuBackend
    from flashmoe_plugin.store.model import open_model
    out = {"cpu_count": os.cpu_count(), "physical_cores": physical_cores(), "load_avg": os.getloadavg()}
    try:
        out["lscpu"] = os.popen("lscpu | grep -E 'Model name|Thread|Core|Socket|NUMA node|L3|Flags' | cut -c1-200").read()
    except OSError:
        pass
    big = torch.ones((4 << 30) // 4, dtype=torch.float32)
    threads = torch.get_num_threads()
    for n in sorted({1, 4, physical_cores(), os.cpu_count() or 1}):
        torch.set_num_threads(n)
        big.sum()
        best = min(_timed(big.sum) for _ in range(3))
        out[f"ram_read_gbps_{n}_threads"] = round(big.numel() * 4 / best / 1e9, 1)
    torch.set_num_threads(threads)
    del big
    store = open_model(store_path)
    layer = sorted(store.layers)[0]
    lay = store.layout_of(layer)
    recs = []
    for e in range(2):
        rec = torch.empty(lay.size, dtype=torch.uint8)
        for f, off, nbytes, into, _ in store.record_reads(layer, e):
            with open(f, "rb") as fh:
                fh.seek(off)
                fh.readinto(memoryview(rec[into:into + nbytes].numpy()))
        recs.append(rec)
    x = torch.ones(1, lay.hidden)
    for n in sorted({physical_cores(), os.cpu_count() or 1}):
        be = CpuBackend(n)
        be.set_spin_us(5000)
        for k in (1, 2):
            be.moe(x, recs[:k], [1.0] * k, lay)
            best = min(_timed(lambda: be.moe(x, recs[:k], [1.0] * k, lay)) for _ in range(30))
            out[f"c_kernels_{k}_experts_{n}_threads_ms"] = round(best * 1e3, 4)
            out[f"c_kernels_{k}_experts_{n}_threads_gbps"] = round(k * lay.size / best / 1e9, 1)
    CpuBackend(physical_cores())  # the pool back at the size CpuLayers uses
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(eng, ids, label: str) -> dict:
    eng.reset()
    t = time.perf_counter()
    logits = eng.forward(ids, last_only=True)[-1]
    pre = time.perf_counter() - t
    probe = probed()
    try:
        dec, times = _decode(eng, logits, TOKENS, temp=1.0, seed=0)
    finally:
        p = probe.result()
    cl = eng.cpu_layers
    r = {"decode_tok_s": round(TOKENS / dec, 3), "prefill_tok_s": round(len(ids) / pre, 1),
         "ms_per_token": [round(v * 1e3, 2) for v in times], "plan": cl.plan_of(eng.config.top_k),
         "costs": {"cpu_s": cl.cpu_s, "copy_s": cl.copy_s, "cpu_o": cl.cpu_o, "cpu_alone": cl.alone},
         "decode_experts_on_gpu": cl.split_up, "probe": p, "load_avg": os.getloadavg()[0], "t": round(time.time() - T0, 1)}
    print(f"{label}: decode {r['decode_tok_s']:.2f} tok/s, prefill {r['prefill_tok_s']:.0f}, plan {r['plan']}, "
          f"probe {p} ({r['t']} s)", flush=True)
    return r


def main(store: str, out: str, budget: float, specs: list[str]):
    doc = {"meta": {"argv": sys.argv, "prompt_tokens": PROMPT, "tokens": TOKENS}}
    dev = os.environ.get("DEVICE", "cuda")

    def save():
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)
    try:
        doc["host"] = ram_and_kernels(store)
    except Exception as e:  # noqa: BLE001 - report and go on with the rows
        doc["host"] = {"error": f"{type(e).__name__}: {e}"}
    print("host:", doc["host"], flush=True)
    save()
    per_run, per_load = 6.0, 30.0  # seconds a run and an engine's start take, updated as they come
    for spec in specs:
        n, config, *forced = spec.split(":")
        shares = [int(c) for c in forced[0].split(",")] if forced and forced[0] else []
        if time.time() - T0 + per_load + 2 * per_run > budget:
            print(spec, "skipped (time)", flush=True)
            continue
        os.environ["FLASHMOE_SLICE_EXPERTS"] = "0" if config == "main" else "1"
        CpuLayers.tune = config != "main"
        t_load = time.time()
        eng = None
        try:
            eng = Engine(store, device=dev, n_cpu_moe=int(n), io_threads=8, n_ctx=PROMPT + TOKENS + 8)
            if dev == "cpu" and config != "main":  # the twin: a stand-in GPU and a tuner, as a CUDA run has
                from flashmoe_plugin.io import aligned_empty
                from flashmoe_plugin.runtime.split_tuner import SplitTuner
                cl = eng.cpu_layers
                cl.attach(eng.backend, aligned_empty(cl.ring_size() * cl.stride), copy_s=1.0, cpu_s=1.0)
                cl.tuners = {eng.config.top_k * cl.cut[cl.layers[0]][0]: SplitTuner(eng.config.top_k * cl.cut[cl.layers[0]][0])}
            ids = prompt_ids(eng.tokenizer, PROMPT, eng.config.vocab_size)
            row = doc[spec] = {"load_s": round(time.time() - t_load, 1), "cut_s": eng.cpu_layers.cut_s}
            per_load = max(15.0, row["load_s"])
            for label in ["first", "again"] + [f"c{c}" for c in shares]:
                if time.time() - T0 + per_run > budget:
                    print(spec, label, "skipped (time)", flush=True)
                    break
                if label.startswith("c"):
                    c = int(label[1:])
                    eng.cpu_layers.tuners = None
                    eng.cpu_layers.plan = lambda k, q=1, c=c: min(c, k * q)
                t = time.time()
                row[label] = run(eng, ids, f"{spec} {label}")
                per_run = max(per_run * 0.5, time.time() - t)
                save()
        except Exception as e:  # noqa: BLE001 - report and go on with the next configuration
            print(spec, "FAILED", type(e).__name__, e, flush=True)
            doc.setdefault(spec, {})["error"] = f"{type(e).__name__}: {e}"
        finally:
            if eng is not None:
                eng.close()
            del eng
            CpuLayers.tune = True
            os.environ.pop("FLASHMOE_SLICE_EXPERTS", None)
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        save()
    doc["meta"]["seconds"] = round(time.time() - T0, 1)
    save()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:])
