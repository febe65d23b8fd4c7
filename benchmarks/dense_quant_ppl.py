"""Quality cost of quantizing the dense part (attention q/k/v/o and the output head) to q8 or q4,
measured on the demo model's held-out windows (flashmoe_plugin/demo_model/heldout_slice.json,
the 8-window perplexity of its model card), through the engine on the CPU.

Each weight goes through quant.py's round trip (quantize, then dequantize to the engine's dtype):
the values a q8/q4 dense path would compute with. This measures the quality side of a
`dense_quant` option only; the bytes it saves need quantized GEMVs in the decode step (not built
yet, see benchmarks/README.md).

    python benchmarks/dense_quant_ppl.py [--windows 8] [--json benchmarks/results/devbox-dense-quant-ppl.json]
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from flashmoe_plugin import demo_model_path, quant
from flashmoe_plugin.runtime.engine import Engine


def dense_names(eng) -> list[str]:
    cfg = eng.config
    names = [f"layers.{i}.attn.{n}.weight" for i in range(cfg.num_layers) for n in "qkvo"]
    return names + (["embed.weight"] if cfg.tie_word_embeddings else ["lm_head.weight"])


def quantize_dense(eng, fmt: str) -> int:
    """Replace the dense matrices by their fmt round trip; returns the quantized bytes.
    q8-absmax: q8 with the plain absmax scale (quant.quantize_q8_absmax, the load-time quantizer)."""
    w, nbytes = eng.model.w, 0
    for name in dense_names(eng):
        t = w[name]
        packed = quant.quantize_q8_absmax(t.float()) if fmt == "q8-absmax" else quant.quantize(t.float(), fmt)
        fmt_ = "q8" if fmt == "q8-absmax" else fmt
        w[name].copy_(quant.dequantize(packed, fmt_, tuple(t.shape)).to(t.dtype))
        nbytes += quant.part_nbytes(fmt_, tuple(t.shape))
    eng.model.lm_head = w["embed.weight"] if eng.config.tie_word_embeddings else w["lm_head.weight"]
    return nbytes


def perplexity(eng, ids: list[int], windows: int, L: int) -> float:
    losses = []
    for k in range(windows):
        window = torch.tensor(ids[k * L:k * L + L + 1])
        eng.reset()
        logits = eng.forward(window[:-1])
        losses.append(F.cross_entropy(logits, window[1:]).item())
    return math.exp(sum(losses) / windows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--json", default=None)
    ap.add_argument("--formats", default="none,q8,q4", help="comma-separated: none, q8, q8-absmax, q4")
    a = ap.parse_args(argv)
    folder = demo_model_path().parent
    data = json.loads((folder / "heldout_slice.json").read_text())
    L, ids = data["seq_len"], data["token_ids"]
    out = {"what": __doc__.splitlines()[0], "windows": a.windows, "seq_len": L, "experts": "q4 (shipped store)",
           "results": {}}
    for fmt in a.formats.split(","):
        eng = Engine(demo_model_path(), n_ctx=L, prefetch="off")
        names = dense_names(eng)
        raw = sum(eng.model.w[n].numel() * 2 for n in names)  # as bf16
        qbytes = raw if fmt == "none" else quantize_dense(eng, fmt)
        t0 = time.perf_counter()
        ppl = perplexity(eng, ids, a.windows, L)
        eng.close()
        out["results"][fmt] = {"ppl": ppl, "dense_matrix_bytes": qbytes, "bf16_bytes": raw,
                               "seconds": time.perf_counter() - t0}
        print(f"dense {fmt}: ppl {ppl:.3f}, dense matrices {qbytes / 1e6:.1f} MB (bf16 {raw / 1e6:.1f} MB)", flush=True)
    base = out["results"]["none"]["ppl"]
    for r in out["results"].values():
        r["ppl_vs_none"] = r["ppl"] / base
    text = json.dumps(out, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
