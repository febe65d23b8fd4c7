"""Quality cost of routing fewer experts per token (--experts-per-token K) than a model's top-k.

For each K: the mean KL divergence KL(p_default || p_K) of the next-token distributions over
held-out text, the top-1 agreement with the default K, and the held-out perplexity (each window
scored from an empty context, all positions). Text: the demo model's held-out windows
(heldout_slice.json) for `--store demo`, else --text FILE tokenized by the store's tokenizer.

    python benchmarks/experts_per_token.py --store demo --ks 4,3,2,1 --out benchmarks/results/x.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flashmoe_plugin.runtime.engine import Engine


def windows_for(store: str, text: str | None, seq_len: int, n: int) -> list[list[int]]:
    if text == "demo":
        import flashmoe_plugin
        data = json.loads((Path(flashmoe_plugin.__file__).parent / "demo_model" / "heldout_slice.json").read_text())
        ids = data["token_ids"]
        seq_len = int(data["seq_len"])
    else:
        ids = Engine(store).tokenizer.encode(Path(text).read_text())
    out = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:n]
    if not out:
        raise SystemExit(f"not enough text for one window of {seq_len} tokens")
    return out


def score(store: str, k: int | None, windows) -> list[torch.Tensor]:
    eng = Engine(store, experts_per_token=k, n_ctx=max(len(w) for w in windows) + 1)
    outs = []
    for w in windows:
        eng.reset()
        outs.append(torch.log_softmax(eng.forward(w).float(), dim=-1))
    eng.close()
    return outs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default="demo")
    ap.add_argument("--ks", default=None, help="comma-separated K values (default: top-k down to 1)")
    ap.add_argument("--text", default=None, help="held-out text file (default: the demo model's held-out slice)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.store == "demo":
        from flashmoe_plugin.demo import demo_model_path
        a.store, a.text = str(demo_model_path()), a.text or "demo"
    default_k = Engine(a.store).config.top_k
    ks = [int(k) for k in a.ks.split(",")] if a.ks else list(range(default_k, 0, -1))
    windows = windows_for(a.store, a.text, a.seq_len, a.windows)
    t0 = time.perf_counter()
    ref = score(a.store, None, windows)
    targets = [torch.tensor(w[1:]) for w in windows]

    def ppl(logps):
        nll = torch.cat([-lp[:-1].gather(1, t[:, None])[:, 0] for lp, t in zip(logps, targets)])
        return math.exp(nll.mean().item())

    base = ppl(ref)
    rows = []
    for k in ks:
        lps = ref if k == default_k else score(a.store, k, windows)
        kl = torch.cat([F.kl_div(lp, r, log_target=True, reduction="none").sum(-1) for lp, r in zip(lps, ref)])
        agree = torch.cat([(lp.argmax(-1) == r.argmax(-1)).float() for lp, r in zip(lps, ref)])
        p = ppl(lps)
        rows.append({"k": k, "kl_mean": kl.mean().item(), "kl_p95": kl.quantile(0.95).item(),
                     "top1_agreement": agree.mean().item(), "ppl": p, "ppl_change": p / base - 1})
        print(f"K={k:3d}  KL {rows[-1]['kl_mean']:.4f} (p95 {rows[-1]['kl_p95']:.4f})  "
              f"top-1 agreement {rows[-1]['top1_agreement']:.3f}  ppl {p:.3f} ({100 * (p / base - 1):+.2f}%)")
    result = {"tool": "benchmarks/experts_per_token.py", "store": a.store, "default_k": default_k,
              "windows": len(windows), "seq_len": len(windows[0]), "tokens_scored": sum(len(w) - 1 for w in windows),
              "ppl_default_k": base, "results": rows, "seconds": time.perf_counter() - t0,
              "machine": platform.processor() or platform.machine(),
              "note": "KL(p_default || p_K) per position, mean and 95th percentile; ppl over the same windows"}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
