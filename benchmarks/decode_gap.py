"""How long the GPU waits for the host between two decode tokens (issue 9): every expert resident,
the same engine timed two ways, one JSON line on stdout.

- wall_ms: a greedy decode loop through Engine.forward (as `flashmoe bench` decodes: the logits
  read back, the next token picked on the host, the next step replayed);
- graph_ms: the captured step replayed back to back with no host work between replays (CUDA
  events around N replays): the GPU's own time per token, gaps between its kernels included;
- gap_ms = wall_ms - graph_ms: what the host adds per token (the sync, settle's bookkeeping, the
  read-back, the sampling, the next input's upload, Python).

    python3 benchmarks/decode_gap.py STORE [--dense-quant q4] [--tokens 64]

Works on any tree whose Engine has the graph-captured decode (engine.fast.graph), so one call can
measure two trees on the same store."""
from __future__ import annotations

import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--dense-quant", default="q4")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    from flashmoe_plugin.runtime.engine import Engine
    from flashmoe_plugin.store.model import open_model
    st = open_model(a.store)
    n_ctx = a.prompt + 8 * a.tokens + 64  # the loops' tokens and the replays' positions
    eng = Engine(a.store, device="cuda", n_ctx=n_ctx, vram_budget=st.expert_bytes, ram_budget=0, prefetch="off",
                 dense_quant=a.dense_quant)
    for layer, info in st.layers.items():
        eng.pager.acquire(layer, list(range(info.experts)))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, eng.config.vocab_size, (a.prompt,), generator=g).tolist()
    logits = eng.forward(ids, last_only=True)[-1]
    out = {"label": a.label, "captured": eng.fast is not None and eng.fast.graph is not None}

    def loop(n, logits):
        for _ in range(n):
            logits = eng.forward([int(logits.argmax())], last_only=True)[-1]
        return logits
    logits = loop(8, logits)  # warm
    walls = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = loop(a.tokens, logits)
        walls.append((time.perf_counter() - t0) / a.tokens * 1e3)
    out["wall_ms"], out["wall_ms_all"] = min(walls), [round(w, 4) for w in walls]
    f = eng.fast
    if out["captured"]:
        with torch.cuda.stream(f.stream):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            graphs = []
            for _ in range(3):
                f.graph.replay()
                start.record()
                for _ in range(a.tokens):
                    f.graph.replay()
                end.record()
                end.synchronize()
                graphs.append(start.elapsed_time(end) / a.tokens)
        out["graph_ms"], out["graph_ms_all"] = min(graphs), [round(x, 4) for x in graphs]
        out["gap_ms"] = out["wall_ms"] - out["graph_ms"]
        out["tok_s"], out["graph_bound_tok_s"] = 1e3 / out["wall_ms"], 1e3 / out["graph_ms"]
    out["misses"] = eng.pager.stats.misses
    eng.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
