"""Kernel figures against bounds measured in the same run: `flashmoe bench --kernels --json`.

run(device="cpu", quick=False) -> {"device", "quick", "machine": {...}, "kernels": [entry, ...]}
Every entry has at least {name, quant, shape, device, gbps, mem_bw_gbps, ratio_vs_mem_bw,
torch_gbps, ratio_vs_torch, max_abs_err}; shape is "rows x cols" of the weight ([out, in]).

CPU entries (device="cpu"; the native module flashmoe_plugin._cpu_kernels, with as many threads
as torch uses, torch.get_num_threads()):
- "mem_copy": memory bandwidth, a plain copy of a large buffer (bytes read + written per
  second, the STREAM convention); `read_gbps` alongside is a read-only pass (torch sum).
- "gemv": one token through one quantized matrix, q8/q4/q2 at the Mixtral-8x7B expert shapes
  (14336x4096 w1/w3, 4096x14336 w2) and the Qwen3.5-397B-A17B ones (1024x4096, 4096x1024).
  gbps = bytes of the quantized part (weights + scales + biases) / time. Every call reads another
  copy, cycling through >= 1 GiB of distinct memory (256 MiB with quick=True), so the figures
  are memory figures, not cache figures. torch path: aten._weight_int4pack_mm_for_cpu on the same
  q4 codes repacked (best of fp32 / bf16 activations), aten._weight_int8pack_mm for q8
  (per-channel scales: its closest format), and quant.dequantize + F.linear otherwise (q2).
  torch_gbps = our part's bytes / torch's time, so ratio_vs_torch = torch time / our time.
- "moe_decode_layer": one decode step through a layer's selected experts in one native call
  (Qwen3.5: k=4 of 4096->1024->4096; Mixtral: k=2 of 4096->14336->4096); torch path: the same
  layer through the int4/int8 pack kernels (q4/q8) or the torch backend (q2).
- "prefill_expert": T tokens through one expert (native register-tiled multi-token kernel)
  against torch's dequantize + F.linear (fp32 GEMM) and, for q4, the int4pack kernel.
max_abs_err: largest |kernel - float64 reference (quant.dequantize)| over one output;
max_rel_err = that / max |reference|.

device="cuda" takes the entries of kernels_cuda.bench_cuda(quick); device="all" both.
"""
from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from .. import quant
from ..progress import NO_PROGRESS
from ..sizes import format_rate
from ..timing import best_seconds
from ..store.layout import RecordLayout

GiB = 1 << 30
MiB = 1 << 20
# [rows, cols] of the expert weights: Mixtral-8x7B w1/w3 and w2, Qwen3.5-397B-A17B w2 and w1/w3
SHAPES = ((14336, 4096), (4096, 14336), (4096, 1024), (1024, 4096))
FORMATS = ("q8", "q4", "q2")


def _module():
    from ..kernels.cpu_backend import _load
    mod, why = _load()
    if mod is None:
        raise RuntimeError(why)
    return mod


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------ helpers

def _pass_times(fn, n: int, passes: int) -> list[float]:
    """Seconds per call of fn(i), i cycling over range(n), for each pass (after one warm-up pass)."""
    for i in range(n):
        fn(i)
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        times.append((time.perf_counter() - t0) / n)
    return times


def _median_time(fn, n: int, passes: int) -> float:
    return statistics.median(_pass_times(fn, n, passes))


def mem_bandwidth(nbytes: int) -> dict:
    """A plain copy (read + write bytes / s) and a read-only pass (torch sum over float32)."""
    a = torch.empty(nbytes, dtype=torch.uint8)
    a.fill_(1)
    b = torch.empty_like(a)
    b.fill_(0)
    t_copy = best_seconds(lambda: b.copy_(a), 5)
    v = a.view(torch.float32)
    t_read = best_seconds(lambda: v.sum(), 5)
    del a, b, v
    gc.collect()
    return {"copy_gbps": 2 * nbytes / t_copy / 1e9, "read_gbps": nbytes / t_read / 1e9}


def _local_bw(run_bw: dict) -> dict:
    """The memory bandwidth measured again right before an entry (256 MiB copy), so that the
    entry's ratio compares figures taken under the same load; the run's start figure is kept."""
    here = mem_bandwidth(256 * MiB)
    here["start_copy_gbps"] = run_bw["copy_gbps"]
    return here


def random_part(fmt: str, shape, gen: torch.Generator | None = None) -> torch.Tensor:
    """One part with random codes, scales ~ U[0.001, 0.021] (q8: / 8), biases ~ N(0, 0.05)."""
    buf = torch.zeros(quant.part_nbytes(fmt, shape), dtype=torch.uint8)
    v = quant.views(buf, fmt, shape)
    if fmt in quant.RAW_DTYPES:
        v["w"].copy_(torch.randn(shape, generator=gen) * 0.05)
        return buf
    v["q"].view(torch.uint8).random_(0, 256, generator=gen)
    if fmt == "q8":
        v["q"].clamp_(-127, 127)
    s = torch.rand(v["scales"].shape, generator=gen) * 0.02 + 0.001
    v["scales"].copy_((s / 8 if fmt == "q8" else s).half())
    if "biases" in v:
        v["biases"].copy_((torch.randn(v["biases"].shape, generator=gen) * 0.05).half())
    return buf


def _replicate(template: torch.Tensor, count: int, align: int = 4096) -> list[torch.Tensor]:
    """count copies of template in distinct memory (rows of one buffer), as 1-D views."""
    nb = template.numel()
    stride = (nb + align - 1) // align * align
    big = torch.empty(count, stride, dtype=torch.uint8)
    big[:, :nb].copy_(template.expand(count, nb))
    return [big[i, :nb] for i in range(count)]


def _progress(msg: str, progress=NO_PROGRESS) -> None:
    """A line per finished measurement on stderr (above the bar, if one is shown)."""
    if os.environ.get("FLASHMOE_BENCH_QUIET") != "1":
        progress.log(f"bench: {msg}")


def _entry(name, fmt, shape, gbps, bw, torch_gbps, err, ref_max, **extra) -> dict:
    e = {
        "name": name, "quant": fmt, "shape": shape, "device": "cpu",
        "gbps": gbps, "mem_bw_gbps": bw["copy_gbps"], "ratio_vs_mem_bw": gbps / bw["copy_gbps"],
        "torch_gbps": torch_gbps, "ratio_vs_torch": (gbps / torch_gbps) if torch_gbps else None,
        "max_abs_err": err, "max_rel_err": (err / ref_max) if (err is not None and ref_max) else None,
        "read_gbps": bw["read_gbps"], "ratio_vs_read_bw": gbps / bw["read_gbps"],
    }
    if "start_copy_gbps" in bw:
        e["mem_bw_start_gbps"] = bw["start_copy_gbps"]
    e.update(extra)
    return e


# ------------------------------------------------------------------------------- torch paths

def _int4pack(part: torch.Tensor, shape, dtype):
    """q4 part -> (packed weight, scales_and_zeros) for aten._weight_int4pack_mm_for_cpu.
    Its dequantization is (q - 8) * scale + zero, so zero = bias + 8 * scale."""
    n, k = shape
    v = quant.views(part, "q4", shape)
    p = v["q"]
    codes = torch.stack([p & 15, p >> 4], dim=-1).view(n, k).to(torch.int32)
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    s, b = v["scales"].float(), v["biases"].float()
    sz = torch.stack([s, b + 8 * s], dim=-1).transpose(0, 1).contiguous().to(dtype)  # [k/64, n, 2]
    return w, sz


def _int8pack(part: torch.Tensor, shape, dtype):
    """q8 part -> (int8 weight, per-row scale) for aten._weight_int8pack_mm (per-channel: the
    row's mean group scale, so the figure is a timing, not a numerically equal path)."""
    v = quant.views(part, "q8", shape)
    return v["q"].contiguous(), v["scales"].float().mean(dim=1).to(dtype).contiguous()


def _torch_linear_fn(fmt: str, template: torch.Tensor, shape, count: int, x: torch.Tensor):
    """The fastest torch path for one quantized matrix: (fn(i, x), calls, label)."""
    if fmt == "q4":
        best = None
        for dt in (torch.float32, torch.bfloat16):
            try:
                w, sz = _int4pack(template, shape, dt)
            except (RuntimeError, NotImplementedError):
                continue
            ws = _replicate(w.view(-1), count)
            wv = [t.view(w.shape) for t in ws]
            xd = x.to(dt)

            def fn(i, wv=wv, sz=sz, xd=xd):
                torch.ops.aten._weight_int4pack_mm_for_cpu(xd, wv[i], 64, sz)

            t = _median_time(fn, count, 2)
            if best is None or t < best[0]:
                best = (t, fn, f"aten._weight_int4pack_mm_for_cpu ({str(dt).replace('torch.', '')} x)", wv)
        if best is not None:
            return best[1], count, best[2], best[0]
    if fmt == "q8":
        best = None
        for dt in (torch.float32, torch.bfloat16):
            try:
                w, s = _int8pack(template, shape, dt)
            except (RuntimeError, NotImplementedError):
                continue
            wv = [t.view(w.shape).view(torch.int8) for t in _replicate(w.view(torch.uint8).view(-1), count)]
            xd = x.to(dt)

            def fn(i, wv=wv, s=s, xd=xd):
                torch.ops.aten._weight_int8pack_mm(xd, wv[i], s)

            t = _median_time(fn, count, 2)
            if best is None or t < best[0]:
                best = (t, fn, f"aten._weight_int8pack_mm ({str(dt).replace('torch.', '')} x, per-channel)")
        if best is not None:
            return best[1], count, best[2], best[0]
    # plain torch: dequantize, then F.linear (what the torch backend does); compute-bound, so a
    # few calls suffice
    parts = _replicate(template, 2)

    def fn(i):
        F.linear(x, quant.dequantize(parts[i], fmt, shape, torch.float32))

    return fn, 1, "quant.dequantize + F.linear (fp32)", _median_time(fn, 1, 1)


# ------------------------------------------------------------------------------------ benches

def bench_gemv(K, fmt: str, shape, bw: dict, total: int) -> dict:
    rows, cols = shape
    nb = quant.part_nbytes(fmt, shape)
    count = max(2, math.ceil(total / nb))
    template = random_part(fmt, shape)
    parts = _replicate(template, count)
    x = torch.randn(1, cols)
    out = torch.empty(1, rows)
    bw = _local_bw(bw)
    times = _pass_times(lambda i: K.linear(x, parts[i], fmt, shape, out=out), count, 3)
    t = statistics.median(times)
    ref = x.double() @ quant.dequantize(template, fmt, shape, torch.float64).T
    y = K.linear(x, parts[0], fmt, shape)
    err = (y.double() - ref).abs().max().item()
    del parts
    gc.collect()
    _, _, label, tt = _torch_linear_fn(fmt, template, shape, count, x)
    gc.collect()
    gbps = nb / t / 1e9
    return _entry("gemv", fmt, f"{rows}x{cols}", gbps, bw, nb / tt / 1e9, err, ref.abs().max().item(),
                  us=t * 1e6, gbps_best=nb / min(times) / 1e9, torch_us=tt * 1e6, torch_path=label, bytes=nb,
                  distinct_bytes=count * nb)


def _records(layout: RecordLayout, count: int) -> list[torch.Tensor]:
    rec = torch.zeros(layout.size, dtype=torch.uint8)
    for p in layout.parts:
        rec[p.offset:p.offset + p.nbytes] = random_part(p.format, p.shape)
    return _replicate(rec, count)


def _ref_layer(x, recs, wts, layout) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float64)
    for rec, w in zip(recs, wts.tolist()):
        w13, w2 = (quant.dequantize(layout.part_bytes(rec, n), p.format, p.shape, torch.float64)
                   for n, p in (("w13", layout.part("w13")), ("w2", layout.part("w2"))))
        g, u = (x.double() @ w13.T).chunk(2, dim=-1)
        out += w * ((F.silu(g) * u) @ w2.T)
    return out


def _torch_layer_fn(fmt: str, layout: RecordLayout, recs, k: int, wts, x):
    """The layer through torch's packed kernels (q4, q8; best of fp32 / bf16 activations) or the
    torch backend (q2): (fn(i), calls, label)."""
    p13, p2 = layout.part("w13"), layout.part("w2")
    n = len(recs)
    calls = max(1, n // k)
    if fmt in ("q4", "q8"):
        pack = _int4pack if fmt == "q4" else _int8pack
        op = (lambda a, w, s: torch.ops.aten._weight_int4pack_mm_for_cpu(a, w, 64, s)) if fmt == "q4" \
            else torch.ops.aten._weight_int8pack_mm
        wl = wts.tolist()
        best = None
        for dt in (torch.float32, torch.bfloat16):
            # pack one record; replicate it into n distinct places (memory is what matters)
            w13, s13 = pack(layout.part_bytes(recs[0], "w13"), p13.shape, dt)
            w2, s2 = pack(layout.part_bytes(recs[0], "w2"), p2.shape, dt)
            w13s = [t.view(w13.dtype).view(w13.shape) for t in _replicate(w13.view(torch.uint8).view(-1), n)]
            w2s = [t.view(w2.dtype).view(w2.shape) for t in _replicate(w2.view(torch.uint8).view(-1), n)]
            xd = x.to(dt)

            def fn(i, w13s=w13s, w2s=w2s, s13=s13, s2=s2, xd=xd):
                out = torch.zeros_like(xd)
                for e in range(k):
                    j = (i * k + e) % n
                    g, u = op(xd, w13s[j], s13).chunk(2, dim=-1)
                    out.add_(op(F.silu(g) * u, w2s[j], s2), alpha=wl[e])
                return out

            t = _median_time(fn, calls, 2)
            if best is None or t < best[0]:
                best = (t, f"{'aten._weight_int4pack_mm_for_cpu' if fmt == 'q4' else 'aten._weight_int8pack_mm (per-channel)'}"
                           f" per matrix ({str(dt).replace('torch.', '')} x)")
            del w13s, w2s
            gc.collect()
        return best[0], best[1]
    from ..kernels.torch_backend import TorchBackend
    tb = TorchBackend()
    fn = lambda i: tb.moe_decode(x, [recs[(i * k + e) % n] for e in range(k)], wts, layout)  # noqa: E731
    return _median_time(fn, 1, 1), "torch backend (quant.dequantize + F.linear)"


def bench_moe_layer(K, fmt: str, H: int, I: int, k: int, bw: dict, total: int) -> dict:
    layout = RecordLayout.build(fmt, H, I)
    spec = K.ExpertSpec.from_layout(layout)
    rec_bytes = sum(p.nbytes for p in layout.parts)
    count = max(k, math.ceil(total / layout.size) // k * k)
    recs = _records(layout, count)
    calls = count // k
    x = torch.randn(1, H)
    wts = torch.softmax(torch.randn(k), 0)
    out = torch.zeros(1, H)
    groups = [recs[i * k:(i + 1) * k] for i in range(calls)]
    bw = _local_bw(bw)
    times = _pass_times(lambda i: K.moe(x, groups[i], wts, spec, out), calls, 3)
    t = statistics.median(times)
    out.zero_()
    K.moe(x, groups[0], wts, spec, out)
    ref = _ref_layer(x, groups[0], wts, layout)
    err = (out.double() - ref).abs().max().item()
    tt, label = _torch_layer_fn(fmt, layout, recs, k, wts, x)
    del recs, groups
    gc.collect()
    gbps = k * rec_bytes / t / 1e9
    return _entry("moe_decode_layer", fmt, f"H{H}xI{I}xk{k}", gbps, bw, k * rec_bytes / tt / 1e9, err,
                  ref.abs().max().item(), us_per_layer=t * 1e6, gbps_best=k * rec_bytes / min(times) / 1e9,
                  torch_us_per_layer=tt * 1e6,
                  torch_path=label, bytes=k * rec_bytes, distinct_bytes=count * rec_bytes)


def bench_prefill(K, fmt: str, H: int, I: int, tokens, bw: dict, total: int) -> list[dict]:
    layout = RecordLayout.build(fmt, H, I)
    spec = K.ExpertSpec.from_layout(layout)
    rec_bytes = sum(p.nbytes for p in layout.parts)
    count = max(2, math.ceil(total / layout.size))
    recs = _records(layout, count)
    p13, p2 = layout.part("w13"), layout.part("w2")
    w13 = quant.dequantize(layout.part_bytes(recs[0], "w13"), fmt, p13.shape, torch.float32)
    w2 = quant.dequantize(layout.part_bytes(recs[0], "w2"), fmt, p2.shape, torch.float32)
    pk = {}
    if fmt == "q4":
        for dt in (torch.float32, torch.bfloat16):
            pk[dt] = (_int4pack(layout.part_bytes(recs[0], "w13"), p13.shape, dt),
                      _int4pack(layout.part_bytes(recs[0], "w2"), p2.shape, dt))
    out = []
    for T in tokens:
        x = torch.randn(T, H)
        y = torch.zeros(T, H)
        n_calls = max(2, min(count, math.ceil(count * 4 / max(T, 4))))
        t = _median_time(lambda i: K.moe(x, (recs[i % count],), (1.0,), spec, y), n_calls, 2)
        y.zero_()
        K.moe(x, (recs[0],), (1.0,), spec, y)
        g, u = (x.double() @ w13.double().T).chunk(2, dim=-1)
        ref = (F.silu(g) * u) @ w2.double().T
        err = (y.double() - ref).abs().max().item()

        def dq(i):  # the torch backend's way: dequantize the expert, then fp32 GEMMs
            a = quant.dequantize(layout.part_bytes(recs[i % count], "w13"), fmt, p13.shape, torch.float32)
            b = quant.dequantize(layout.part_bytes(recs[i % count], "w2"), fmt, p2.shape, torch.float32)
            gg, uu = F.linear(x, a).chunk(2, dim=-1)
            F.linear(F.silu(gg) * uu, b)

        td = _median_time(dq, 1, 1)
        best, label = td, "quant.dequantize + F.linear (fp32)"
        for dt, ((a, sa), (b, sb)) in pk.items():
            xd = x.to(dt)

            def i4(i, a=a, sa=sa, b=b, sb=sb, xd=xd):
                gg, uu = torch.ops.aten._weight_int4pack_mm_for_cpu(xd, a, 64, sa).chunk(2, dim=-1)
                torch.ops.aten._weight_int4pack_mm_for_cpu(F.silu(gg) * uu, b, 64, sb)

            ti = _median_time(i4, 2, 2)
            if ti < best:
                best, label = ti, (f"aten._weight_int4pack_mm_for_cpu ({str(dt).replace('torch.', '')} x,"
                                   " one expert: cache-resident for small ones)")
        gbps = rec_bytes / t / 1e9
        flops = 2 * T * 3 * H * I
        out.append(_entry("prefill_expert", fmt, f"H{H}xI{I}xT{T}", gbps, bw, rec_bytes / best / 1e9, err,
                          ref.abs().max().item(), tokens=T, us=t * 1e6, gflops=flops / t / 1e9,
                          torch_us=best * 1e6, torch_path=label, torch_dequant_linear_us=td * 1e6))
    del recs
    gc.collect()
    return out


def bench_cpu(quick: bool = False, progress=NO_PROGRESS) -> tuple[list[dict], dict]:
    K = _module()
    fmts_moe = ("q4",) if quick else FORMATS
    steps = 1 + len(FORMATS) * len(SHAPES) + len(fmts_moe) + 1 + (1 if quick else 2)
    done = iter(range(1, steps + 1))

    def step(line: str | None = None):  # one measurement done
        progress(next(done), steps)
        if line:
            _progress(line, progress)
    progress(0, steps)
    threads = torch.get_num_threads()
    K.set_num_threads(threads)
    total = 256 * MiB if quick else int(1.05 * GiB)
    bw = mem_bandwidth(256 * MiB if quick else GiB)
    machine = {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "threads": threads, "isa": K.isa(),
               "torch": torch.__version__, "working_set_bytes": total}
    entries = [{
        "name": "mem_copy", "quant": None, "shape": None, "device": "cpu", "gbps": bw["copy_gbps"],
        "mem_bw_gbps": bw["copy_gbps"], "ratio_vs_mem_bw": 1.0, "torch_gbps": None, "ratio_vs_torch": None,
        "max_abs_err": None, "read_gbps": bw["read_gbps"],
    }]
    step(f"memory: copy {format_rate(bw['copy_gbps'] * 1e9)}, read {format_rate(bw['read_gbps'] * 1e9)}; "
         f"{threads} threads, {K.isa()}")
    for fmt in FORMATS:
        for shape in SHAPES:
            entries.append(bench_gemv(K, fmt, shape, bw, total))
            step(_line(entries[-1]))
    for fmt in fmts_moe:
        entries.append(bench_moe_layer(K, fmt, 4096, 1024, 4, bw, total))
        step(_line(entries[-1]))
    entries.append(bench_moe_layer(K, "q4", 4096, 14336, 2, bw, total))
    step(_line(entries[-1]))
    n = len(entries)
    entries += bench_prefill(K, "q4", 4096, 1024, (1, 4, 16) if quick else (1, 2, 4, 8, 16, 64), bw,
                             min(total, 256 * MiB))
    step()
    if not quick:
        entries += bench_prefill(K, "q4", 4096, 14336, (1, 8, 64), bw, 256 * MiB)
        step()
    for e in entries[n:]:
        _progress(_line(e), progress)
    return entries, machine


def _line(e: dict) -> str:
    return (f"{e['name']} {e['quant']} {e['shape']}: {format_rate(e['gbps'] * 1e9)} = {e['ratio_vs_mem_bw']:.2f} x copy bw, "
            f"{e['ratio_vs_torch']:.2f} x torch ({e.get('torch_path', '')})")


def run(device: str = "cpu", quick: bool = False, progress=NO_PROGRESS) -> dict:
    """All kernel figures for device 'cpu', 'cuda' (kernels_cuda.bench_cuda) or 'all'."""
    dev = device.split(":")[0]
    if dev not in ("cpu", "cuda", "all"):
        raise ValueError(f"bench --kernels: unknown device {device!r}; expected cpu, cuda or all")
    result = {"device": dev, "quick": quick, "kernels": []}
    if dev in ("cpu", "all"):
        entries, machine = bench_cpu(quick, progress)
        result["machine"] = machine
        result["kernels"] += entries
    if dev in ("cuda", "all"):
        from .kernels_cuda import bench_cuda
        result["kernels"] += bench_cuda(quick)
    return result


def main(argv=None) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="flashmoe kernel benchmark (JSON)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    print(json.dumps(run(a.device, a.quick), indent=1))


if __name__ == "__main__":
    main()
