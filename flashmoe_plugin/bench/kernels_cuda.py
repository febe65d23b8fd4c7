"""CUDA kernel figures, each against bounds measured in the same run (DESIGN.md section 9).

bench_cuda(quick=False) -> list[dict], one entry per measurement, keys at least
  {name, quant, shape, device, gbps, mem_bw_gbps, ratio_vs_mem_bw, torch_gbps, ratio_vs_torch,
   max_abs_err}
- "mem_copy": the memory bandwidth, a large device-to-device copy (bytes read + written).
- "gemv": one quantized matrix times one bf16 token, for q8/q4/q2 at the Mixtral-8x7B expert
  shapes (14336x4096, 4096x14336) and the Qwen3.5-397B ones (4096x1024 = w2 rows x cols is
  written N x K here, 1024x4096). gbps = quantized bytes (weights + scales + biases) / time;
  every call reads a different matrix, cycling through >= 1 GiB (so the 50-60 MB L2 holds
  none of them), timed by CUDA-graph replay with CUDA events (launch cost excluded: the engine
  replays graphs too). torch path: quant.dequantize + F.linear in bf16 (what the torch
  backend does), and for q4 aten._weight_int4pack_mm (tinygemm) on the same bytes
  repacked; torch_gbps is the best of these.
- "moe_decode_layer": one decode step through a layer's selected experts (Qwen3.5: 4 experts of
  4096->1024->4096; Mixtral: 2 of 4096->14336->4096), one fused launch (cooperative; the
  two-launch figure alongside), us_per_layer by graph replay and eagerly from Python.
- "prefill_expert": T tokens through one expert, the fused kernel against dequantize + cuBLAS
  (bf16), to place the crossover that CudaBackend.fused_max_tokens encodes.
max_abs_err: largest |kernel - float64 reference| over one output (bf16 activations, fp32 out),
with max_rel_err = that / max |reference|.
"""
from __future__ import annotations

import math
import statistics
import sys

import torch
import torch.nn.functional as F

from .. import quant
from ..pager.tiers import event_times
from ..store.layout import RecordLayout

GiB = 1 << 30
MIXTRAL = ((14336, 4096), (4096, 14336))
QWEN35 = ((4096, 1024), (1024, 4096))


def _k():
    from .. import _kernels_cuda
    return _kernels_cuda


def _events_time(fn, reps: int) -> float:
    """Median seconds of fn() over reps, CUDA events around each."""
    return statistics.median(event_times(fn, reps))


def _graph_time(step, n: int, reps: int = 5):
    """Seconds per step(i), i < n, captured once into a CUDA graph and replayed (median)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(min(n, 3)):
            step(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n):
            step(i)
    g.replay()
    torch.cuda.synchronize()
    t = _events_time(g.replay, reps) / n
    del g
    return t


def _eager_time(step, n: int, reps: int = 3):
    def run():
        for i in range(n):
            step(i)
    run()
    return _events_time(run, reps) / n


def mem_bandwidth(nbytes: int = 2 * GiB) -> dict:
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_()
    t = _events_time(lambda: b.copy_(a), 7)
    v = a.view(torch.float32)
    tr = _events_time(lambda: v.sum(), 7)
    del a, b, v
    torch.cuda.empty_cache()
    return {"copy_gbps": 2 * nbytes / t / 1e9, "read_gbps": nbytes / tr / 1e9}


def _fill_parts(buf2d: torch.Tensor, fmt: str, shape) -> None:
    """Random packed weights, scales in [0.001, 0.021] (q8: divided by 16, so that its weights,
    -128..127 times the scale, span what q4's 0..15 do), biases ~ N(0, 0.05): every part of a
    [count, stride] buffer at once. Without the 1/16, q8's random weights are 16x larger, a layer's
    output ~250x (two matrices) and its max_abs_err with it (8.6 on the H200 at a max_rel_err of
    4.7e-5, the same relative error as q4's)."""
    rows, cols = shape
    buf2d.random_(0, 256)
    count = buf2d.shape[0]
    for s in quant.sections(fmt, shape):
        if s.name in ("scales", "biases"):
            view = buf2d[:, s.offset:s.offset + s.nbytes].view(torch.float16)
            if s.name == "scales":
                scale = (torch.rand(count, view.shape[1], device="cuda") * 0.02 + 0.001) / (16 if fmt == "q8" else 1)
                view.copy_(scale.half())
            else:
                view.copy_((torch.randn(count, view.shape[1], device="cuda") * 0.05).half())


def _int4pack_time(buf2d, stride, shape, x, count):
    """tinygemm on the same q4 bytes (repacked once, outside the timing)."""
    n, k = shape
    secs = {s.name: s for s in quant.sections("q4", shape)}
    packs, szs = [], []
    for i in range(count):
        v = quant.views(buf2d[i], "q4", shape)
        packs.append(torch.ops.aten._convert_weight_to_int4pack(v["q"].contiguous(), 8))
        s = v["scales"].to(torch.bfloat16)
        z = (v["biases"].float() + 8 * v["scales"].float()).to(torch.bfloat16)
        szs.append(torch.stack([s, z], dim=-1).transpose(0, 1).contiguous())  # [K/64, N, 2]
    del secs

    def step(i):
        j = i % count
        torch.ops.aten._weight_int4pack_mm(x, packs[j], 64, szs[j])

    t = _graph_time(step, count)
    del packs, szs
    return t


def bench_gemv(fmt: str, shape, mem_bw: float, total_bytes: int, dev: str, reps: int = 5) -> dict:
    K = _k()
    n, k = shape
    nb = quant.part_nbytes(fmt, shape)
    stride = (nb + 255) // 256 * 256
    count = max(2, math.ceil(total_bytes / stride))
    buf = torch.empty(count, stride, dtype=torch.uint8, device="cuda")
    _fill_parts(buf, fmt, shape)
    x = torch.randn(1, k, device="cuda").bfloat16()
    y = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
    st = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731

    def step(i):
        K.linear(buf[i % count], fmt, n, k, x, y, st())

    t = _graph_time(step, count, reps)
    grid, bps, smem, stages = (K.tune("last_grid"), K.tune("last_blocks_per_sm"), K.tune("last_smem"),
                               K.tune("last_stages"))
    # accuracy on one part: bf16 x, fp32 out, against float64
    w = torch.empty(n, k, device="cuda")
    K.dequant(buf[0], fmt, n, k, w)
    ref = w.double() @ x.double()[0]
    y32 = torch.empty(1, n, device="cuda")
    K.linear(buf[0], fmt, n, k, x, y32)
    err = (y32[0].double() - ref).abs().max().item()
    rel = err / ref.abs().max().item()
    del w
    # torch paths
    tcount = min(count, 8)

    def tstep(i):
        wq = quant.dequantize(buf[i % tcount], fmt, shape, torch.bfloat16)
        F.linear(x, wq)

    t_torch = _eager_time(tstep, tcount, 2)
    t_int4 = None
    if fmt == "q4":
        try:
            t_int4 = _int4pack_time(buf, stride, shape, x, count)
        except Exception as e:  # noqa: BLE001 - report, don't fail the bench
            t_int4 = None
            print(f"int4pack path failed: {type(e).__name__}: {e}", file=sys.stderr)
    # bf16 weights through cuBLAS (what bf16 storage would cost: 3.6x the bytes of q4)
    nbf = max(2, math.ceil(total_bytes / (n * k * 2)))
    del buf
    torch.cuda.empty_cache()
    wb = torch.randn(nbf, n, k, device="cuda", dtype=torch.bfloat16)
    t_bf16 = _graph_time(lambda i: F.linear(x, wb[i % nbf]), nbf, reps)
    del wb
    torch.cuda.empty_cache()
    best_torch = min(tt for tt in (t_torch, t_int4) if tt is not None)
    gbps = nb / t / 1e9
    tg = nb / best_torch / 1e9
    return {
        "name": "gemv", "quant": fmt, "shape": f"{n}x{k}", "device": dev,
        "gbps": gbps, "mem_bw_gbps": mem_bw, "ratio_vs_mem_bw": gbps / mem_bw,
        "torch_gbps": tg, "ratio_vs_torch": gbps / tg, "max_abs_err": err, "max_rel_err": rel,
        "us": t * 1e6, "bytes": nb, "distinct_bytes": count * nb, "prefetch": K.tune("prefetch"),
        "grid": grid, "blocks_per_sm": bps, "smem": smem, "ring_stages": stages,
        "torch_dequant_linear_us": t_torch * 1e6,
        "torch_int4pack_us": None if t_int4 is None else t_int4 * 1e6,
        "torch_bf16_weights_linear_us": t_bf16 * 1e6,
    }


def _records(layout: RecordLayout, fmt: str, count: int) -> torch.Tensor:
    recs = torch.empty(count, layout.size, dtype=torch.uint8, device="cuda")
    recs.random_(0, 256)
    for p in layout.parts:
        _fill_parts(recs[:, p.offset:p.offset + p.nbytes], fmt, p.shape)
    return recs


def bench_moe_layer(fmt: str, H: int, I: int, k: int, mem_bw: float, total_bytes: int, dev: str,
                    reps: int = 5) -> dict:
    K = _k()
    from ..kernels.cuda_backend import CudaBackend
    from ..kernels.torch_backend import TorchBackend

    layout = RecordLayout.build(fmt, H, I)
    rec_bytes = sum(p.nbytes for p in layout.parts)
    count = max(k, math.ceil(total_bytes / layout.size) // k * k)
    recs = _records(layout, fmt, count)
    lt = CudaBackend.layout_tuple(layout)
    x = torch.randn(1, H, device="cuda").bfloat16()
    out = torch.empty(1, H, dtype=torch.bfloat16, device="cuda")
    w = torch.softmax(torch.randn(k, device="cuda"), 0)
    ws = torch.zeros(K.workspace_bytes(k, I), dtype=torch.uint8, device="cuda")
    calls = count // k
    st = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731

    def step_mode(mode):
        def step(i):
            j = (i % calls) * k
            K.moe([recs[j + e] for e in range(k)], lt, w, x, out, ws, st(), mode=mode)
        return step

    res = {}
    for mode in ("coop", "two"):
        try:
            res[mode] = _graph_time(step_mode(mode), calls, reps)
        except Exception as e:  # noqa: BLE001
            print(f"moe {mode} under graph capture failed ({type(e).__name__}: {e}); timing eagerly", file=sys.stderr)
            res[mode] = _eager_time(step_mode(mode), calls)
    eager = _eager_time(step_mode("auto"), calls)
    # accuracy: bf16 x, fp32 out, against float64
    out32 = torch.empty(1, H, device="cuda")
    K.moe([recs[e] for e in range(k)], lt, w, x, out32, ws, st())
    ref = TorchBackend().moe_decode(x.double(), [recs[e] for e in range(k)], w.double(), layout)
    err = (out32.double() - ref).abs().max().item()
    rel = err / ref.abs().max().item()
    tb = TorchBackend()
    xb = x.bfloat16()
    t_torch = _eager_time(lambda i: tb.moe_decode(xb, [recs[(i * k + e) % count] for e in range(k)], w, layout),
                          min(calls, 4), 2)
    del recs
    torch.cuda.empty_cache()
    best = min(res.values())
    gbps = k * rec_bytes / best / 1e9
    tg = k * rec_bytes / t_torch / 1e9
    return {
        "name": "moe_decode_layer", "quant": fmt, "shape": f"H{H}xI{I}xk{k}", "device": dev,
        "gbps": gbps, "mem_bw_gbps": mem_bw, "ratio_vs_mem_bw": gbps / mem_bw,
        "torch_gbps": tg, "ratio_vs_torch": gbps / tg, "max_abs_err": err, "max_rel_err": rel,
        "us_per_layer": best * 1e6, "us_per_layer_coop": res["coop"] * 1e6,
        "us_per_layer_two_launch": res["two"] * 1e6, "us_per_layer_eager": eager * 1e6,
        "torch_backend_us_per_layer": t_torch * 1e6, "bytes": k * rec_bytes,
        "distinct_bytes": count * rec_bytes,
    }


def bench_prefill(fmt: str, H: int, I: int, tokens, mem_bw: float, dev: str) -> list[dict]:
    K = _k()
    from ..kernels.cuda_backend import CudaBackend

    layout = RecordLayout.build(fmt, H, I)
    rec_bytes = sum(p.nbytes for p in layout.parts)
    count = max(2, math.ceil((512 << 20) / layout.size))
    recs = _records(layout, fmt, count)
    be = CudaBackend()
    lt = be.layout_tuple(layout)
    ws = be.workspace(torch.device("cuda", torch.cuda.current_device()), 1, I)
    out = []
    for T in tokens:
        x = torch.randn(T, H, device="cuda").bfloat16()
        y = torch.empty(T, H, dtype=torch.bfloat16, device="cuda")

        def fused(i):
            K.moe([recs[i % count]], lt, None, x, y, ws, torch.cuda.current_stream().cuda_stream)

        def dq(i):
            be.dequant_ffn(x, recs[i % count], layout)

        tf = _graph_time(fused, count, 3)
        td = _graph_time(dq, count, 3)
        gbps = rec_bytes / tf / 1e9
        out.append({
            "name": "prefill_expert", "quant": fmt, "shape": f"H{H}xI{I}xT{T}", "device": dev,
            "gbps": gbps, "mem_bw_gbps": mem_bw, "ratio_vs_mem_bw": gbps / mem_bw,
            "torch_gbps": rec_bytes / td / 1e9, "ratio_vs_torch": td / tf, "max_abs_err": None,
            "tokens": T, "us_fused": tf * 1e6, "us_dequant_cublas": td * 1e6,
            "winner": "fused" if tf < td else "dequant+cublas",
        })
    del recs
    torch.cuda.empty_cache()
    return out


def tune_prefetch(mem_bw: float, total_bytes: int, dev: str,
                  settings=((0, 0), (0, 64 << 10), (0, 256 << 10), (1, 64 << 10)),
                  ) -> list[dict]:
    """Blocks per SM (0: occupancy limit) and the phase-B L2 prefetch window against time, q4:
    the Mixtral GEMVs and the Qwen3.5 4-expert layer (coop and two launches)."""
    K = _k()
    from ..kernels.cuda_backend import CudaBackend

    st = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    old = K.tune("max_blocks_per_sm"), K.tune("prefetch")
    out = []
    for n, k in MIXTRAL:
        nb = quant.part_nbytes("q4", (n, k))
        stride = (nb + 255) // 256 * 256
        count = max(2, math.ceil(total_bytes / stride))
        buf = torch.empty(count, stride, dtype=torch.uint8, device="cuda")
        _fill_parts(buf, "q4", (n, k))
        x = torch.randn(1, k, device="cuda").bfloat16()
        y = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
        for bps, pf in settings:
            K.tune("max_blocks_per_sm", bps)
            K.tune("prefetch", pf)
            t = _graph_time(lambda i: K.linear(buf[i % count], "q4", n, k, x, y, st()), count)
            out.append({"name": "tune_gemv", "quant": "q4", "shape": f"{n}x{k}", "device": dev,
                        "max_bps": bps, "prefetch": pf, "us": t * 1e6, "gbps": nb / t / 1e9,
                        "ratio_vs_mem_bw": nb / t / 1e9 / mem_bw, "grid": K.tune("last_grid"),
                        "blocks_per_sm": K.tune("last_blocks_per_sm")})
        del buf
    layout = RecordLayout.build("q4", 4096, 1024)
    rb = sum(p.nbytes for p in layout.parts)
    count = math.ceil(total_bytes / layout.size) // 4 * 4
    recs = _records(layout, "q4", count)
    lt = CudaBackend.layout_tuple(layout)
    x = torch.randn(1, 4096, device="cuda").bfloat16()
    y = torch.empty(1, 4096, dtype=torch.bfloat16, device="cuda")
    w = torch.softmax(torch.randn(4, device="cuda"), 0)
    ws = torch.zeros(K.workspace_bytes(4, 1024), dtype=torch.uint8, device="cuda")
    calls = count // 4
    for bps, pf in settings:
        K.tune("max_blocks_per_sm", bps)
        K.tune("prefetch", pf)
        for mode in ("coop", "two"):
            t = _graph_time(lambda i: K.moe([recs[(i % calls) * 4 + e] for e in range(4)], lt, w, x, y, ws, st(),
                                            mode=mode), calls)
            out.append({"name": "tune_layer", "quant": "q4", "shape": "H4096xI1024xk4", "device": dev,
                        "max_bps": bps, "prefetch": pf, "mode": mode, "us_per_layer": t * 1e6,
                        "gbps": 4 * rb / t / 1e9, "ratio_vs_mem_bw": 4 * rb / t / 1e9 / mem_bw,
                        "grid": K.tune("last_grid"), "blocks_per_sm": K.tune("last_blocks_per_sm")})
    del recs
    torch.cuda.empty_cache()
    K.tune("max_blocks_per_sm", old[0])
    K.tune("prefetch", old[1])
    return out


def bench_cuda(quick: bool = False, tune: bool = False) -> list[dict]:
    """All CUDA kernel figures (see the module docstring). Needs a GPU and the built module."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_cuda needs an NVIDIA GPU (CUDA)")
    _k()
    dev = torch.cuda.get_device_name()
    total = (256 << 20) if quick else int(1.1 * GiB)
    mb = mem_bandwidth((512 << 20) if quick else 2 * GiB)
    bw = mb["copy_gbps"]
    entries = [{
        "name": "mem_copy", "quant": None, "shape": None, "device": dev, "gbps": bw, "mem_bw_gbps": bw,
        "ratio_vs_mem_bw": 1.0, "torch_gbps": None, "ratio_vs_torch": None, "max_abs_err": None,
        "read_gbps": mb["read_gbps"],
    }]
    fmts = ("q4",) if quick else ("q8", "q4", "q2")
    shapes = (MIXTRAL[0], QWEN35[0]) if quick else MIXTRAL + QWEN35

    def run(label, fn, *args):
        """One measurement; a failure becomes an entry with its error instead of ending the run."""
        try:
            r = fn(*args)
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            r = {"name": label, "device": dev, "error": f"{type(e).__name__}: {e}"}
            torch.cuda.empty_cache()
        rs = r if isinstance(r, list) else [r]
        for x in rs:
            print(f"# {x.get('name')} {x.get('quant')} {x.get('shape')}: "
                  f"{x.get('gbps') or 0:.0f} GB/s {x.get('error', '')}", file=sys.stderr, flush=True)
        entries.extend(rs)

    for fmt in fmts:
        for shape in shapes:
            run("gemv", bench_gemv, fmt, shape, bw, total, dev)
    for fmt in fmts:
        run("moe_decode_layer", bench_moe_layer, fmt, 4096, 1024, 4, bw, total, dev)
    run("moe_decode_layer", bench_moe_layer, "q4", 4096, 14336, 2, bw, total, dev)
    tokens = (1, 4, 16, 64) if quick else (1, 2, 4, 8, 16, 32, 64, 256)
    run("prefill_expert", bench_prefill, "q4", 4096, 14336, tokens, bw, dev)
    if not quick:
        run("prefill_expert", bench_prefill, "q4", 4096, 1024, tokens, bw, dev)
    if tune:
        run("tune_prefetch", tune_prefetch, bw, total, dev)
    return entries


def main(argv=None) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tune", action="store_true", help="also sweep the L2 prefetch window")
    ap.add_argument("--json", metavar="FILE", help="also write the entries to FILE")
    a = ap.parse_args(argv)
    entries = bench_cuda(quick=a.quick, tune=a.tune)
    text = json.dumps({"kernels": entries}, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
