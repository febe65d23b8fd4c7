"""Where a warm GPU prefill's time goes, and the grouped tensor-core prefill against an expert at a
time (issue 9). One JSON on stdout.

    python benchmarks/prefill_profile.py STORE [--tokens 512] [--reps 3] [--kernels] > out.json

For each path ("grouped": csrc/cuda/fm_prefill.cu, two launches per layer for all experts;
"grouped_masked_attention": the same with attention as before issue 9's change, an explicit mask
(SDPA's fp32 math path under GQA); "per_expert": one expert at a time, dequantize + cuBLAS above
CudaBackend.fused_max_tokens tokens):
  - warm prefill tok/s (every expert resident in VRAM, one untimed prefill first, then `reps`
    timed ones, each after eng.reset(); median and all), every path before any profiling;
  - the host's time to queue a prompt (the model's forward, no read-back) against the time until
    the GPU is done (host_enqueue_ms_median, gpu_done_ms_median);
  - one more prefill under torch.profiler: device time per kernel (top kernels and by category),
    per stream, GPU idle time (wall less the union of kernel intervals), the runtime calls that
    wait for the GPU (synchronize, memcpy) and host time (wall less those waits);
  - the timed prefills again after the profiler ran (tok_s_after_profiler_median): Kineto leaves
    CUPTI attached, which slows later launches (pytorch/pytorch#144455).
With --kernels: the grouped kernel against dequantize + cuBLAS on Mixtral-8x7B's expert shape
(4096 -> 14336), 8 experts of T tokens each, T = 16..512, q4 (each variant) and q8: microseconds
per expert.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

import torch

CATEGORIES = [  # first match wins
    ("grouped prefill GEMM (ours)", r"grouped_kernel"),
    ("dequantize (ours)", r"dequant_kernel"),
    ("fused expert kernel (ours)", r"moe_kernel|linear_kernel|fmc_"),
    ("cuBLAS / CUTLASS GEMM", r"gemm|cutlass|xmma|nvjet|sm90_|sm80_|cublas|Kernel2"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("copies / index / sort", r"[Ii]ndex|[Gg]ather|[Ss]catter|[Ss]ort|radix|copy|Memcpy|Memset|cat|CatArray"),
]


def category(name: str) -> str:
    for cat, pat in CATEGORIES:
        if re.search(pat, name):
            return cat
    return "elementwise / reductions / other"


def union_ms(intervals) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1000.0


def profile_once(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1000
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    prof.export_chrome_trace(path)
    with open(path) as f:
        trace = json.load(f)
    os.unlink(path)
    kernels, runtime = {}, {}
    by_cat, by_stream, spans = {}, {}, []
    n_kernels = 0
    for ev in trace.get("traceEvents", []):
        cat, dur = ev.get("cat", ""), float(ev.get("dur", 0) or 0)
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            name = ev.get("name", "?")
            n_kernels += cat == "kernel"
            k = kernels.setdefault(name, [0, 0.0])
            k[0] += 1
            k[1] += dur / 1000
            c = category(name) if cat == "kernel" else "copies / index / sort"
            by_cat[c] = by_cat.get(c, 0.0) + dur / 1000
            s = str(ev.get("args", {}).get("stream", "?"))
            by_stream[s] = by_stream.get(s, 0.0) + dur / 1000
            spans.append((float(ev["ts"]), float(ev["ts"]) + dur))
        elif cat == "cuda_runtime":
            r = runtime.setdefault(ev.get("name", "?"), [0, 0.0])
            r[0] += 1
            r[1] += dur / 1000
    waits = sum(v[1] for n, v in runtime.items() if re.search(r"Synchronize|Memcpy(?!Async)|MemcpyAsync", n))
    busy = union_ms(spans)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]
    return {
        "wall_ms": wall,
        "gpu_busy_ms": busy,
        "gpu_idle_ms": wall - busy,
        "device_ms_sum": sum(v[1] for v in kernels.values()),
        "kernels": n_kernels,
        "by_category_ms": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
        "by_stream_ms": by_stream,
        "top_kernels": [{"name": n[:160], "count": v[0], "ms": round(v[1], 3)} for n, v in top],
        "runtime_calls": {n: {"count": v[0], "ms": round(v[1], 3)} for n, v in
                          sorted(runtime.items(), key=lambda kv: -kv[1][1])[:12]},
        "host_wait_ms": waits,
        "host_ms": wall - waits,
        "note": "profiler overhead included in wall/host times; device times are the kernels' own",
    }


def best_variant(kernels: list[dict], tokens_per_expert: int = 128) -> str:
    """The fastest q4 kernel variant at this many tokens per expert in a --kernels sweep."""
    row = next(r for r in kernels if r["fmt"] == "q4" and r["tokens_per_expert"] == tokens_per_expert)
    times = {k[len("grouped_"):-len("_us_per_expert")]: v for k, v in row.items()
             if k.startswith("grouped_") and k.endswith("_us_per_expert")}
    return min(times, key=times.get)


def _masked_sdpa():
    """F.scaled_dot_product_attention as it was called before issue 9's change: is_causal turned
    back into an explicit boolean mask (with GQA that sends SDPA to its fp32 math path)."""
    import torch.nn.functional as F
    orig = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, is_causal=False, **kw):
        if is_causal:
            T, S = q.shape[-2], k.shape[-2]
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        return orig(q, k, v, attn_mask=attn_mask, is_causal=False, **kw)
    return orig, sdpa


def prefill_rows(store: str, tokens: int, reps: int, dense_quant: str | None, variant: str = "auto") -> dict:
    """Every path's timed prompts first, then each path profiled, then every path timed again:
    torch.profiler leaves CUPTI attached (pytorch/pytorch#144455), which slows later launches."""
    from flashmoe_plugin.kernels import prefill_cuda
    from flashmoe_plugin.models import layers
    from flashmoe_plugin.runtime.engine import Engine
    prefill_cuda.variant = variant
    # verify=False: records are not checksummed as they load (load time only; nothing timed)
    eng = Engine(store, device="cuda", n_ctx=tokens + 8, prefetch="off", dense_quant=dense_quant, verify=False)
    for layer, info in eng.store.layers.items():
        eng.pager.acquire(layer, list(range(info.experts)))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, eng.config.vocab_size, (tokens,), generator=g).tolist()
    supports = prefill_cuda.supports
    sdpa, masked = _masked_sdpa()
    out = {"dense_quant": eng.dense_quant, "layers": eng.config.num_layers, "tokens": tokens, "variant": variant,
           "paths": {"grouped": "the grouped kernel, attention with is_causal (flash)",
                     "grouped_masked_attention": "the grouped kernel, attention with an explicit mask (SDPA's "
                                                 "fp32 math path with GQA: before issue 9's change)",
                     "per_expert": "an expert at a time (dequantize + cuBLAS), attention with is_causal"}}
    paths = list(out["paths"])

    def use(path):
        prefill_cuda.supports = (lambda x, layout: False) if path == "per_expert" else supports
        layers.F.scaled_dot_product_attention = masked if path == "grouped_masked_attention" else sdpa

    def run():
        eng.reset()
        return eng.forward(ids, last_only=True)

    def timed(n):
        secs = []
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = run()
            secs.append(time.perf_counter() - t0)
        return secs, logits
    def enqueue():
        # the model's forward without Engine.forward's read-back: when the host returns, and
        # when the GPU is done (the host runs ahead when the first is well below the second)
        eng.reset()
        t = torch.tensor(ids, dtype=torch.long, device=eng.device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            eng.model.forward(t, 0, eng.kv, eng._experts, last_only=True)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return 1000 * (t1 - t0), 1000 * (time.perf_counter() - t0)
    last = {}
    try:
        for path in paths:
            use(path)
            first = run()
            torch.cuda.synchronize()
            secs, logits = timed(reps)
            host = [enqueue() for _ in range(reps)]
            out[path] = {"tok_s_median": tokens / statistics.median(secs), "tok_s_all": [tokens / s for s in secs],
                         "ms_median": 1000 * statistics.median(secs), "last_logits_argmax": int(logits.argmax()),
                         "first_vs_repeat_max_abs": float((first - logits).abs().max()),
                         "host_enqueue_ms_median": statistics.median(h for h, _ in host),
                         "gpu_done_ms_median": statistics.median(d for _, d in host)}
            last[path] = logits.float()
        for path in paths:
            use(path)
            row = out[path]
            row["profile"] = profile_once(run)
            print(f"# prefill {path}: {row['tok_s_median']:.0f} tok/s ({row['tok_s_all']}), profiled: "
                  f"wall {row['profile']['wall_ms']:.1f} ms, GPU busy {row['profile']['gpu_busy_ms']:.1f}, "
                  f"{row['profile']['by_category_ms']}", file=sys.stderr, flush=True)
        for path in paths:
            use(path)
            secs, _ = timed(reps)
            out[path]["tok_s_after_profiler_median"] = tokens / statistics.median(secs)
        a, b = out["grouped"], out["per_expert"]
        out["speedup"] = a["tok_s_median"] / b["tok_s_median"]
        for other in ("per_expert", "grouped_masked_attention"):
            d = last["grouped"] - last[other]
            out[f"last_logits_rel_diff_grouped_vs_{other}"] = float(d.norm() / last[other].norm())
    finally:
        prefill_cuda.supports = supports
        layers.F.scaled_dot_product_attention = sdpa
        prefill_cuda.variant = "auto"
        eng.close()
    return out


def kernel_rows(H=4096, I=14336, E=8, Ts=(16, 64, 128, 256, 512), reps=5) -> list[dict]:
    from flashmoe_plugin import quant
    from flashmoe_plugin.kernels import prefill_cuda
    from flashmoe_plugin.kernels.cuda_backend import CudaBackend
    from flashmoe_plugin.store.layout import RecordLayout
    be, rows = CudaBackend(), []
    for fmt, variants in (("q4", ("auto", "dequant")), ("q8", ("auto",))):
        layout = RecordLayout.build(fmt, H, I)
        recs = []
        for _ in range(E):
            rec = torch.randint(0, 256, (layout.size,), dtype=torch.uint8, device="cuda")
            for p in layout.parts:
                v = quant.views(rec[p.offset:p.offset + p.nbytes], p.format, p.shape)
                v["scales"].copy_(((torch.rand(v["scales"].shape, device="cuda") + 0.05) * 0.02).half())
                if "biases" in v:
                    v["biases"].copy_((torch.randn(v["biases"].shape, device="cuda") * 0.05).half())
            recs.append(rec)
        for T in Ts:
            x = torch.randn(E * T, H, device="cuda").bfloat16()
            counts = [T] * E

            def grouped(var):
                def fn():
                    prefill_cuda.variant = var
                    try:
                        return prefill_cuda.grouped_ffn(x, recs, counts, layout)
                    finally:
                        prefill_cuda.variant = "auto"
                return fn

            def per_expert():
                return torch.cat([be.dequant_ffn(x[i * T:(i + 1) * T], recs[i], layout) for i in range(E)])

            res = {"fmt": fmt, "tokens_per_expert": T, "experts": E}
            fns = [(f"grouped_{v}", grouped(v)) for v in variants] + [("dequant_cublas", per_expert)]
            ref = per_expert().float()
            for name, fn in fns:
                y = fn()
                if name != "dequant_cublas":
                    res[f"{name}_rel_diff_vs_dequant_cublas"] = float((y.float() - ref).norm() / ref.norm())
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(reps):
                    fn()
                b.record()
                torch.cuda.synchronize()
                us = a.elapsed_time(b) * 1000 / reps / E
                res[f"{name}_us_per_expert"] = us
                res[f"{name}_tflops"] = 2 * T * 3 * H * I / (us * 1e-6) / 1e12
            rows.append(res)
            print(f"# kernels {fmt} T={T}: " + ", ".join(f"{n} {res[n + '_us_per_expert']:.0f} us" for n, _ in fns),
                  file=sys.stderr, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", nargs="?")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dense-quant", default="auto")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--variant", default="auto",
                    help="q4 kernel variant for the prefill rows: auto, dequant, or best:KERNELS.json "
                         "(the fastest at 128 tokens per expert in that --kernels output)")
    a = ap.parse_args()
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if a.kernels:
        out["kernels"] = kernel_rows()
    variant = a.variant
    if variant.startswith("best:"):
        with open(variant[5:]) as f:
            variant = best_variant(json.load(f)["kernels"])
    elif variant == "best" and "kernels" in out:
        variant = best_variant(out["kernels"])
    if a.store:
        out["prefill"] = prefill_rows(a.store, a.tokens, a.reps, a.dense_quant, variant)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
