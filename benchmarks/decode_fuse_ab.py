"""kernels/decode_fuse.py's folds (none, the norm only, norm and routing) and the cooperative expert
kernel's early trigger of the next launch (tune key coop_trigger) off and on, in one process on one
engine with every expert resident: one JSON line on stdout (and each run's line on stderr). Per
variant (all in turn, `--rounds` times: drift between the rounds shows, and the best of each
counts; "fold0-trig0" is main's step):

- kernels: the captured step's kernel nodes;
- graph_ms: the captured step replayed back to back (CUDA events), the GPU's time per token;
- wall_ms: the greedy decode loop through Engine.forward (as `flashmoe bench` decodes);
- the logits of the loop's tokens, from the same prompt: the largest difference between the
  variants while their tokens agree (the folds round as the formulas do; only the router's fp32
  sums run in another order) and how many tokens agree.

    python3 benchmarks/decode_fuse_ab.py STORE [--dense-quant q4] [--tokens 64] [--rounds 2]
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
    a = ap.parse_args()
    from flashmoe_plugin.kernels import decode_fuse
    from flashmoe_plugin.runtime.engine import Engine
    from flashmoe_plugin.runtime.graph_decode import DeviceDecode
    from flashmoe_plugin.store.model import open_model
    st = open_model(a.store)
    n_ctx = a.prompt + 5 * a.tokens + 64  # the loop's tokens and the replays' positions
    eng = Engine(a.store, device="cuda", n_ctx=n_ctx, vram_budget=st.expert_bytes, ram_budget=0, prefetch="off",
                 dense_quant=a.dense_quant)
    for layer, info in st.layers.items():
        eng.pager.acquire(layer, list(range(info.experts)))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, eng.config.vocab_size, (a.prompt,), generator=g).tolist()
    out = {"store": a.store, "dense_quant": a.dense_quant, "tokens": a.tokens, "layers": eng.config.num_layers,
           "runs": []}
    logits_of = {}

    from flashmoe_plugin.kernels.cuda_backend import kernels

    def run(fold: int, trig: int) -> dict:
        decode_fuse.FOLDS = fold  # read by DeviceDecode (its ops' static `fold` argument)
        kernels().tune("coop_trigger", trig)  # read at each launch: the capture below holds it
        eng.fast.close()
        eng.reset()
        t0 = time.perf_counter()
        eng.fast = f = DeviceDecode(eng, "on")
        r = {"fold": fold, "trig": trig, "capture_s": round(time.perf_counter() - t0, 2), "captured": f.captured,
             "why_not": f.why_not, "kernels": f.kernels_per_step()}
        logits = eng.forward(prompt, last_only=True)[-1]
        seq = []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.tokens):
            seq.append(logits.float().cpu())
            logits = eng.forward([int(logits.argmax())], last_only=True)[-1]
        torch.cuda.synchronize()
        r["wall_ms"] = (time.perf_counter() - t0) / a.tokens * 1e3
        logits_of.setdefault((fold, trig), torch.stack(seq))
        if f.captured:
            with torch.cuda.stream(f.stream):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                f.graph.replay()
                start.record()
                for _ in range(a.tokens):
                    f.graph.replay()
                end.record()
                end.synchronize()
            r["graph_ms"] = start.elapsed_time(end) / a.tokens
        r["fallbacks"] = f.fallbacks
        return r

    # folds (1: the attention norm in the q/k/v GEMV, 2: the routing kernel), coop_trigger
    variants = [(0, 0), (3, 1), (3, 0), (1, 0), (1, 1), (0, 1)]
    for _ in range(a.rounds):
        for fold, trig in variants:
            out["runs"].append(run(fold, trig))
            print(json.dumps(out["runs"][-1]), file=sys.stderr, flush=True)
    ref = logits_of[(0, 0)]
    for fold, trig in variants:
        runs = [r for r in out["runs"] if (r["fold"], r["trig"]) == (fold, trig)]
        v = out[f"fold{fold}-trig{trig}"] = {
            "kernels": runs[0]["kernels"], "graph_ms": min(r.get("graph_ms", float("inf")) for r in runs),
            "wall_ms": min(r["wall_ms"] for r in runs)}
        v["graph_speedup"] = out["fold0-trig0"]["graph_ms"] / v["graph_ms"]
        v["tok_s"] = 1e3 / v["wall_ms"]
        got, same = logits_of[(fold, trig)], 0
        while same < len(ref) and int(ref[same].argmax()) == int(got[same].argmax()):
            same += 1
        n = min(same + 1, len(ref))  # the steps fed the same tokens
        v["tokens_agree"] = same
        v["logits_max_abs_diff"] = float((ref[:n] - got[:n]).abs().max())
        v["logits_equal"] = bool(torch.equal(ref[:n], got[:n]))
    out["logits_scale"] = float(ref.abs().max())
    eng.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
