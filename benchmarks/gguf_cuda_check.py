"""The CUDA twin of the GGUF block formats on a GPU machine (CI has none): dequantization bit for
bit against gguf-py for every supported type, a GGUF expert FFN on CUDA against the CPU
kernels, a tiny GGUF model through Engine on CUDA against the CPU, and the dequantize kernel's
throughput on a Mixtral-sized Q4_0 matrix. Prints JSON (argument: output path).

    PYTHONPATH=<gguf-py> python benchmarks/gguf_cuda_check.py out.json
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main(out_path):
    import gguf
    from gguf.quants import dequantize as ref_dequant
    from gguf_oracles import gguf_layout, random_part

    from flashmoe_plugin import _gguf_kernels_cuda as kc
    from flashmoe_plugin import quant, quant_gguf
    from flashmoe_plugin.kernels.cpu_backend import CpuBackend
    from flashmoe_plugin.kernels.cuda_backend import CudaBackend

    res = {"device": torch.cuda.get_device_name(0), "dequant_bit_exact": {}}
    for fmt in sorted(quant_gguf.BLOCK_FORMATS):
        rows, cols = 257, 4096
        part = random_part(fmt, rows, cols, seed=7)
        want = torch.from_numpy(ref_dequant(part.numpy().reshape(rows, -1),
                                            gguf.GGMLQuantizationType(quant_gguf.BLOCK_FORMATS[fmt][0])).copy())
        got = kc.dequantize(part.cuda(), fmt, (rows, cols)).cpu()
        res["dequant_bit_exact"][fmt] = bool(torch.equal(got.view(torch.int32), want.view(torch.int32)))
    for fmt, dt in quant.RAW_DTYPES.items():
        w = torch.randn(64, 512).to(dt)
        got = kc.dequantize(w.view(-1).view(torch.uint8).cuda(), fmt, (64, 512)).cpu()
        res["dequant_bit_exact"][fmt] = bool(torch.equal(got, w.float()))

    H, I = 1024, 2048
    lay = gguf_layout("q4_k", "q6_k", H, I)
    rec = torch.zeros(lay.size, dtype=torch.uint8)
    rec[:lay.part("w13").nbytes] = random_part("q4_k", 2 * I, H, seed=1)
    p2 = lay.part("w2")
    rec[p2.offset:p2.offset + p2.nbytes] = random_part("q6_k", H, I, seed=2)
    x = torch.randn(4, H)
    a = CpuBackend().expert_ffn(x, rec, lay)
    b = CudaBackend().expert_ffn(x.cuda(), rec.cuda(), lay).cpu()
    res["expert_ffn_q4k_q6k_max_rel_diff"] = ((a - b).abs().max() / a.abs().max()).item()

    from gguf_oracles import write_tiny_gguf

    from flashmoe_plugin.runtime.engine import Engine
    with tempfile.TemporaryDirectory() as d:
        p = write_tiny_gguf(Path(d) / "tiny.gguf", "Q4_0")
        ids = list(range(3, 60))
        cpu = Engine(p).forward(ids)
        gpu = Engine(p, device="cuda", dtype=torch.float32).forward(ids)
        res["engine_tiny_q4_0_cuda_vs_cpu_max_abs"] = (cpu - gpu).abs().max().item()

    rows, cols = 14336, 4096
    part = random_part("q4_0", rows, cols, seed=3).cuda()
    out = torch.empty(rows, cols, device="cuda")
    for _ in range(3):
        kc.dequantize(part, "q4_0", (rows, cols), out)
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        kc.dequantize(part, "q4_0", (rows, cols), out)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / n
    res["dequant_q4_0_14336x4096"] = {"us": dt * 1e6, "gb_per_s_read_plus_written": (part.numel() + out.numel() * 4) / dt / 1e9}
    Path(out_path).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gguf_cuda.json")
