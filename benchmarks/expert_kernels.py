"""The expert kernels at the memory bound (issue 9, scope 4): one compact H200 measurement.

    python benchmarks/expert_kernels.py [--json FILE] [--label NAME]
    FMC_KERNELS_SO=/path/_kernels_cuda....so python benchmarks/expert_kernels.py ...   (another build)

q4 GEMVs at the Mixtral-8x7B and Qwen3.5 expert shapes, the decode MoE layers (Qwen3.5: 4 experts
of 4096x1024; Mixtral: 2 of 4096x14336; cooperative one launch and two launches) and a q8 layer's
error. Every figure is timed as `flashmoe bench --kernels` times it (CUDA-graph replay over >= 1
GiB of distinct weights, median of 5), against the copy bandwidth of the same run. Errors: the
largest |kernel - float64 reference| of one output (bf16 x, fp32 out) and that over max |reference|.

FMC_KERNELS_SO loads another build of flashmoe_plugin._kernels_cuda (same Cython wrapper, other
CUDA source) in its place, so that two kernel versions are measured on the same machine in one
call; `swap()` does it for any entry point (e.g. before `flashmoe bench`).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys

GiB = 1 << 30


def swap() -> str | None:
    """Load $FMC_KERNELS_SO as flashmoe_plugin._kernels_cuda (before anything imports it); set the
    ring depth knob to $FMC_STAGES where given."""
    so = os.environ.get("FMC_KERNELS_SO")
    if so:
        spec = importlib.util.spec_from_file_location("flashmoe_plugin._kernels_cuda", so)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["flashmoe_plugin._kernels_cuda"] = mod
        import flashmoe_plugin
        flashmoe_plugin._kernels_cuda = mod
    if os.environ.get("FMC_STAGES"):
        import flashmoe_plugin._kernels_cuda as K
        K.tune("stages", int(os.environ["FMC_STAGES"]))
    return so or None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--label", default="")
    ap.add_argument("--total-gib", type=float, default=1.1)
    ap.add_argument("--stages", default="", help="comma-separated ring depths to time each case at "
                    "(tune('stages'): 0 = auto); default: the build's default only")
    a = ap.parse_args(argv)
    depths = [int(v) for v in a.stages.split(",") if v != ""] or [None]
    so = swap()
    import torch

    import flashmoe_plugin._kernels_cuda as K
    from flashmoe_plugin import quant
    from flashmoe_plugin.bench.kernels_cuda import _fill_parts, _graph_time, _records, mem_bandwidth
    from flashmoe_plugin.kernels.cuda_backend import CudaBackend
    from flashmoe_plugin.kernels.torch_backend import TorchBackend
    from flashmoe_plugin.store.layout import RecordLayout

    total = int(a.total_gib * GiB)
    bw = mem_bandwidth(2 * GiB)["copy_gbps"]
    st = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731 - the capture stream inside a graph
    out = {"label": a.label, "kernels_so": so, "device": torch.cuda.get_device_name(), "copy_gbps": bw,
           "entries": []}

    def set_depth(sv):
        """Set the ring depth knob; ' stages N' (the depth the next launch uses) for the label."""
        if sv is None:
            return ""
        K.tune("stages", sv)
        return f" stages {sv}" + (" (auto)" if sv == 0 else "")

    def emit(e):
        if "stages" in e["what"]:
            e["last_stages"] = K.tune("last_stages")
        out["entries"].append(e)
        print(f"# {a.label} {e['what']}: {e['us']:.2f} us, {e['ratio_vs_copy']:.3f} of copy, grid {e['grid']}, "
              f"rel err {e['rel_err']:.2e}", file=sys.stderr, flush=True)

    for fmt, (n, k) in (("q4", (14336, 4096)), ("q4", (4096, 14336)), ("q4", (4096, 1024)), ("q4", (1024, 4096)),
                        ("q8", (14336, 4096))):
        nb = quant.part_nbytes(fmt, (n, k))
        stride = (nb + 255) // 256 * 256
        count = max(2, math.ceil(total / stride))
        buf = torch.empty(count, stride, dtype=torch.uint8, device="cuda")
        _fill_parts(buf, fmt, (n, k))
        x = torch.randn(1, k, device="cuda").bfloat16()
        y = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(n, k, device="cuda")
        K.dequant(buf[0], fmt, n, k, w)
        ref = w.double() @ x.double()[0]
        del w
        y32 = torch.empty(1, n, device="cuda")
        K.linear(buf[0], fmt, n, k, x, y32)
        err = (y32[0].double() - ref).abs().max().item()
        for sv in depths:
            stages = set_depth(sv)
            t = _graph_time(lambda i: K.linear(buf[i % count], fmt, n, k, x, y, st()), count)
            emit({"what": f"gemv {fmt} {n}x{k}{stages}", "us": t * 1e6, "bytes": nb,
                  "ratio_vs_copy": nb / t / 1e9 / bw, "grid": K.tune("last_grid"),
                  "blocks_per_sm": K.tune("last_blocks_per_sm"), "smem": K.tune("last_smem"),
                  "max_abs_err": err, "rel_err": err / ref.abs().max().item()})
        del buf
        torch.cuda.empty_cache()

    for fmt, H, I, k in (("q4", 4096, 1024, 4), ("q4", 4096, 14336, 2), ("q8", 4096, 1024, 4)):
        layout = RecordLayout.build(fmt, H, I)
        rb = sum(p.nbytes for p in layout.parts)
        count = max(k, math.ceil(total / layout.size) // k * k)
        recs = _records(layout, fmt, count)
        lt = CudaBackend.layout_tuple(layout)
        x = torch.randn(1, H, device="cuda").bfloat16()
        yb = torch.empty(1, H, dtype=torch.bfloat16, device="cuda")
        wt = torch.softmax(torch.randn(k, device="cuda"), 0)
        ws = torch.zeros(K.workspace_bytes(k, I), dtype=torch.uint8, device="cuda")
        calls = count // k
        out32 = torch.empty(1, H, device="cuda")
        K.moe([recs[e] for e in range(k)], lt, wt, x, out32, ws, st())
        ref = TorchBackend().moe_decode(x.double(), [recs[e] for e in range(k)], wt.double(), layout)
        err = (out32.double() - ref).abs().max().item()
        rel = err / ref.abs().max().item()
        for sv in depths:
            for mode in ("coop", "two"):
                stages = set_depth(sv)
                t = _graph_time(lambda i: K.moe([recs[(i % calls) * k + e] for e in range(k)], lt, wt, x, yb, ws,
                                                st(), mode=mode), calls)
                emit({"what": f"moe layer {fmt} H{H} I{I} k{k} {mode}{stages}", "us": t * 1e6, "bytes": k * rb,
                      "ratio_vs_copy": k * rb / t / 1e9 / bw, "grid": K.tune("last_grid"),
                      "blocks_per_sm": K.tune("last_blocks_per_sm"), "smem": K.tune("last_smem"),
                      "max_abs_err": err, "rel_err": rel, "ref_max_abs": ref.abs().max().item()})
        del recs
        torch.cuda.empty_cache()

    text = json.dumps(out, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    print(f"copy {bw:.0f} GB/s", file=sys.stderr)


if __name__ == "__main__":
    main()
