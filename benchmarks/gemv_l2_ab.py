"""The decode GEMV's L2 knob (fm_gemv.cu, gemv_tune("l2"), FLASHMOE_GEMV_L2) off and on, in one
process on one engine with every expert resident: one JSON line on stdout (each run's line on
stderr). Each variant re-captures the step (the knob is read at each launch, so the graph holds it);
the variants run in turn, then in reverse order (`--rounds` such passes: drift shows, the best of
each counts). Variant l2 = 0 is main's step; bits: 1 the plain GEMV (o after attention), 2 the q/k/v
GEMV with its norm (after the experts), 4 a block per item also prefetches its mirror block's rows.

- graph_ms: the captured step replayed back to back (CUDA events), the GPU's time per token, best
  of 3 x `--tokens` replays; wall_ms: the greedy loop through Engine.forward;
- logits_equal: the loop's logits equal main's bit for bit (the prefetch moves no data the kernel
  reads differently), tokens_agree: how many greedy tokens agree.

    python3 benchmarks/gemv_l2_ab.py STORE [--dense-quant q4] [--tokens 64] [--rounds 2] [--l2 0,1,5,3,7]

--device cpu runs the same loop on the CPU twin (no capture, no GEMV: only the script's logic).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--dense-quant", default="q4")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--l2", default="0,1,5,3,7", help="the knob's values, main's (0) first")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    from flashmoe_plugin.kernels.cuda_backend import kernels
    from flashmoe_plugin.runtime.engine import Engine
    from flashmoe_plugin.runtime.graph_decode import DeviceDecode
    from flashmoe_plugin.store.model import open_model
    values = [int(v) for v in a.l2.split(",")]
    if values[0] != 0:
        raise SystemExit("--l2: the first value must be 0 (main's step, the reference)")
    km = kernels()
    if km is None and a.device == "cuda":
        raise SystemExit("flashmoe_plugin._kernels_cuda is not built")
    st = open_model(a.store)
    n_ctx = a.prompt + 6 * a.tokens + 64  # the loop's tokens and the replays' positions
    budgets = dict(vram_budget=st.expert_bytes, ram_budget=0) if a.device == "cuda" else dict(ram_budget=st.expert_bytes)
    eng = Engine(a.store, device=a.device, n_ctx=n_ctx, prefetch="off", dense_quant=a.dense_quant, **budgets)
    for layer, info in st.layers.items():
        eng.pager.acquire(layer, list(range(info.experts)))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, eng.config.vocab_size, (a.prompt,), generator=g).tolist()
    out = {"label": a.label, "store": a.store, "dense_quant": a.dense_quant, "tokens": a.tokens,
           "layers": eng.config.num_layers, "device": a.device, "runs": []}
    if a.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    logits_of = {}

    def run(l2: int) -> dict:
        if km is not None:
            km.gemv_tune("l2", l2)  # read at each launch: the capture below holds it
        if eng.fast is not None:
            eng.fast.close()
        eng.reset()
        t0 = time.perf_counter()
        eng.fast = f = DeviceDecode(eng, "on")
        r = {"l2": l2, "capture_s": round(time.perf_counter() - t0, 2), "captured": f.captured, "why_not": f.why_not,
             "kernels": f.kernels_per_step()}
        logits = eng.forward(prompt, last_only=True)[-1]
        seq = []
        if a.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.tokens):
            seq.append(logits.float().cpu())
            logits = eng.forward([int(logits.argmax())], last_only=True)[-1]
        if a.device == "cuda":
            torch.cuda.synchronize()
        r["wall_ms"] = (time.perf_counter() - t0) / a.tokens * 1e3
        logits_of.setdefault(l2, torch.stack(seq))
        if f.captured:
            times = []
            with torch.cuda.stream(f.stream):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                f.graph.replay()
                for _ in range(3):
                    start.record()
                    for _ in range(a.tokens):
                        f.graph.replay()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / a.tokens)
            r["graph_ms"], r["graph_ms_all"] = min(times), [round(t, 4) for t in times]
        return r

    order = values
    for _ in range(a.rounds):
        for l2 in order:
            out["runs"].append(run(l2))
            print(json.dumps(out["runs"][-1]), file=sys.stderr, flush=True)
        order = order[::-1]  # alternate: no variant always runs first or last
    if km is not None:
        km.gemv_tune("l2", 0)
    ref = logits_of[0]
    for l2 in values:
        runs = [r for r in out["runs"] if r["l2"] == l2]
        v = out[f"l2-{l2}"] = {"kernels": runs[0]["kernels"], "wall_ms": min(r["wall_ms"] for r in runs)}
        graphs = [r["graph_ms"] for r in runs if "graph_ms" in r]
        if graphs:
            v["graph_ms"] = min(graphs)
            v["graph_speedup"] = out["l2-0"]["graph_ms"] / v["graph_ms"]
        got, same = logits_of[l2], 0
        while same < len(ref) and int(ref[same].argmax()) == int(got[same].argmax()):
            same += 1
        v["tokens_agree"] = same
        v["logits_equal"] = bool(torch.equal(ref, got))
    eng.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
