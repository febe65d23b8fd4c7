#!/usr/bin/env python3
"""Measure the demo model on held-out text on the CPU: perplexity and routing statistics.

    python examples/train_demo_model/analyze.py [--model examples/train_demo_model/hf_model]
        [--heldout .device/data/heldout.u16.xz] [--json analysis.json] [--windows N]
        [--stores none=DIR q8=DIR ...]

Perplexity: mean next-token loss over non-overlapping windows of --seq-len tokens of the held-out
stream, each window scored from an empty context (the protocol train.py uses). Routing, from the
routers of transformers' Qwen3MoeForCausalLM in fp32 on the same windows:

- usage entropy per layer: entropy of the distribution of routed (token, slot) pairs over the
  experts, in bits and as a fraction of log2(E) (1.0 = perfectly even);
- next-token reuse per layer: |S_t ∩ S_{t+1}| / k for consecutive tokens t, t+1 (S = the top-k
  set); a router that ignored its input would give k/E;
- next-layer prediction precision@k: layer L+1's router (its post-attention RMSNorm, then its
  gate) applied to a hidden state that exists before layer L+1's experts are needed, compared with
  the experts layer L+1 really picks. Three sources: (a) `in_L`, the residual stream entering layer
  L (prefetch one whole layer ahead, while layer L runs); (b) `mid_L`, layer L's post-attention
  residual (the router input of layer L, before layer L's experts run; what the pager's predictor
  uses); (c) `in_L+1`, the residual entering layer L+1 (prefetch during L+1's attention);
- distinct experts touched per layer over 30 consecutive tokens (Flash-MoE's figure), and a
  per-layer LRU hit rate for caches of 4/8/16 experts per layer.

--stores name=DIR ...: also measure held-out perplexity through flashmoe's own Engine on each store
(`Engine(store, device="cpu").forward(ids)` returns [T, vocab] logits), same windows.
"""
from __future__ import annotations

import argparse
import json
import lzma
import math
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


def load_heldout(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if path.suffix == ".xz":
        raw = lzma.decompress(raw)
    return np.frombuffer(raw, dtype=np.uint16).astype(np.int64)


def windows(tokens, seq_len, n_max):
    n = min((len(tokens) - 1) // seq_len, n_max)
    return [(tokens[w * seq_len:(w + 1) * seq_len], tokens[w * seq_len + 1:(w + 1) * seq_len + 1])
            for w in range(n)]


def entropy_bits(counts):
    p = counts / counts.sum()
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def lru_hit_rate(seq_sets, capacity):
    cache, hits, total = OrderedDict(), 0, 0
    for s in seq_sets:
        for e in s:
            total += 1
            if e in cache:
                hits += 1
                cache.move_to_end(e)
            else:
                cache[e] = True
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return hits / max(total, 1)


@torch.no_grad()
def hf_analysis(model_dir, tokens, seq_len, n_windows, threads):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    L, E, k = cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok
    layers = model.model.layers
    cap, capturing = {}, [False]

    def pre_hook(name):
        def f(mod, args, kwargs=None):
            if capturing[0]:                  # only during the model's own forward, not route()
                h = args[0] if args else kwargs["hidden_states"]
                cap[name] = h.detach().reshape(-1, h.shape[-1]).clone()
        return f

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(pre_hook(f"in{i}"), with_kwargs=True))
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(pre_hook(f"mid{i}")))

    def route(i, h):
        """Layer i's router applied to residual-stream state h -> top-k ids [N, k]."""
        x = layers[i].post_attention_layernorm(h)
        logits = F.linear(x, layers[i].mlp.gate.weight)
        return logits.topk(k, dim=-1).indices

    tot_loss, tot_n = 0.0, 0
    usage = np.zeros((L, E), dtype=np.int64)
    reuse = np.zeros(L)
    reuse_n = 0
    prec = {src: np.zeros(L - 1) for src in ("in_L", "mid_L", "in_L+1")}
    prec_n = 0
    distinct30 = [[] for _ in range(L)]
    lru = {c: np.zeros(L) for c in (4, 8, 16)}
    t0 = time.time()
    for x, y in windows(tokens, seq_len, n_windows):
        ids = torch.as_tensor(x)[None]
        capturing[0] = True
        out = model(input_ids=ids)
        capturing[0] = False
        loss = F.cross_entropy(out.logits[0].float(), torch.as_tensor(y), reduction="sum")
        tot_loss += loss.item()
        tot_n += len(y)
        sel = [route(i, cap[f"mid{i}"]) for i in range(L)]              # real routing
        for i in range(L):
            s = sel[i].numpy()
            usage[i] += np.bincount(s.reshape(-1), minlength=E)
            a, b = np.sort(s[:-1], 1), np.sort(s[1:], 1)
            inter = (s[:-1, :, None] == s[1:, None, :]).any(-1).sum(-1)
            reuse[i] += inter.sum() / k
            sets = [set(r) for r in s.tolist()]
            for c in lru:
                lru[c][i] += lru_hit_rate(sets, c)
            for j in range(0, len(sets) - 29, 30):
                distinct30[i].append(len(set().union(*sets[j:j + 30])) / E)
        reuse_n += len(x) - 1
        for i in range(L - 1):
            actual = sel[i + 1]
            for src, h in (("in_L", cap[f"in{i}"]), ("mid_L", cap[f"mid{i}"]), ("in_L+1", cap[f"in{i + 1}"])):
                pred = route(i + 1, h)
                hit = (pred[:, :, None] == actual[:, None, :]).any(-1).sum().item()
                prec[src][i] += hit / k
        prec_n += len(x)
    nw = len(windows(tokens, seq_len, n_windows))
    for h in hooks:
        h.remove()
    ent = [entropy_bits(usage[i]) for i in range(L)]
    res = {
        "windows": nw, "seq_len": seq_len, "tokens": tot_n, "seconds": time.time() - t0,
        "heldout_loss": tot_loss / tot_n, "heldout_ppl": math.exp(tot_loss / tot_n),
        "num_experts": E, "top_k": k, "random_reuse_baseline": k / E,
        "usage_entropy_bits": ent, "usage_entropy_frac": [e / math.log2(E) for e in ent],
        "usage_share_max": [float(usage[i].max() / usage[i].sum()) for i in range(L)],
        "usage_share_min": [float(usage[i].min() / usage[i].sum()) for i in range(L)],
        "next_token_reuse": (reuse / reuse_n).tolist(),
        "next_layer_precision_at_k": {s: (v / prec_n).tolist() for s, v in prec.items()},
        "distinct_experts_per_30_tokens": [float(np.mean(d)) for d in distinct30],
        "lru_hit_rate_per_layer": {str(c): (v / nw).tolist() for c, v in lru.items()},
        "expert_frequency": (usage / usage.sum(1, keepdims=True)).round(5).tolist(),
    }
    return res


@torch.no_grad()
def hf_ppl(model_dir, tokens, seq_len, n_windows):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    per = []
    for x, y in windows(tokens, seq_len, n_windows):
        logits = model(input_ids=torch.as_tensor(x)[None]).logits[0].float()
        per.append(F.cross_entropy(logits, torch.as_tensor(y)).item())
    loss = float(np.mean(per))
    return {"heldout_loss": loss, "heldout_ppl": math.exp(loss), "tokens": len(per) * seq_len,
            "window_losses": per}


@torch.no_grad()
def engine_ppl(store, tokens, seq_len, n_windows):
    from flashmoe_plugin.runtime.engine import Engine

    eng = Engine(str(store), device="cpu")
    per, t0 = [], time.time()
    for x, y in windows(tokens, seq_len, n_windows):
        eng.reset()
        logits = torch.as_tensor(eng.forward(list(map(int, x)))).float()
        per.append(F.cross_entropy(logits, torch.as_tensor(y)).item())
    loss = float(np.mean(per))
    return {"heldout_loss": loss, "heldout_ppl": math.exp(loss), "tokens": len(per) * seq_len,
            "seconds": time.time() - t0, "window_losses": per}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(HERE / "hf_model"))
    ap.add_argument("--heldout", default=".device/data/heldout.u16.xz")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=10 ** 9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(HERE / "analysis.json"))
    ap.add_argument("--stores", nargs="*", default=[], help="name=STORE_DIR to measure through the Engine")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--slice-out", default=None, help="write the engine windows' token ids and losses here")
    ap.add_argument("--engine-windows", type=int, default=8,
                    help="windows (from the start of the held-out stream) for the Engine comparison")
    args = ap.parse_args(argv)
    tokens = load_heldout(Path(args.heldout))
    res = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    if not args.skip_hf:
        res["hf"] = hf_analysis(args.model, tokens, args.seq_len, args.windows, args.threads)
        h = res["hf"]
        print(f"HF fp32: held-out loss {h['heldout_loss']:.4f}  ppl {h['heldout_ppl']:.2f}  "
              f"({h['tokens']} tokens, {h['windows']} windows)")
        print("layer  entropy/max  reuse(next tok)  prec@k in_L  mid_L  in_L+1  distinct/30  lru8")
        for i in range(len(h["usage_entropy_frac"])):
            p = h["next_layer_precision_at_k"]
            pl = [f"{p[s][i]:.3f}" if i < len(p[s]) else "  -  " for s in ("in_L", "mid_L", "in_L+1")]
            print(f"{i:5d}  {h['usage_entropy_frac'][i]:.3f}        {h['next_token_reuse'][i]:.3f}"
                  f"            {pl[0]}  {pl[1]}  {pl[2]}   {h['distinct_experts_per_30_tokens'][i]:.3f}"
                  f"       {h['lru_hit_rate_per_layer']['8'][i]:.3f}")
    if args.stores:
        r = hf_ppl(args.model, tokens, args.seq_len, args.engine_windows)
        res.setdefault("engine", {})["hf_fp32_same_windows"] = r
        print(f"HF fp32 on the engine windows: loss {r['heldout_loss']:.4f} ppl {r['heldout_ppl']:.3f}")
    for spec in args.stores:
        name, path = spec.split("=", 1)
        r = engine_ppl(path, tokens, args.seq_len, args.engine_windows)
        res.setdefault("engine", {})[name] = r
        print(f"engine {name}: held-out loss {r['heldout_loss']:.4f} ppl {r['heldout_ppl']:.3f} "
              f"({r['seconds']:.0f} s)")
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    if args.slice_out and args.stores:
        n = args.engine_windows * args.seq_len + 1
        eng = res["engine"]
        Path(args.slice_out).write_text(json.dumps({
            "what": "the first windows of the demo model's held-out token stream and their mean next-token "
                    "loss, each window scored from an empty context; the mean over the first m windows "
                    "(m <= windows) is a perplexity check: exp(mean(window_losses[:m]))",
            "seq_len": args.seq_len, "windows": args.engine_windows,
            "window_losses": {k: v["window_losses"] for k, v in eng.items()},
            "ppl": {k: v["heldout_ppl"] for k, v in eng.items()},
            "token_ids": [int(t) for t in tokens[:n]],
        }) + "\n")


if __name__ == "__main__":
    main()
