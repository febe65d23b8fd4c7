"""Our engine against llama.cpp on llama.cpp's own quantized files: argmax agreement, and why.

    python benchmarks/gguf_agreement.py [--seeds 3 4 5] [--out benchmarks/results/devbox-gguf-q8-agreement.json]

The oracle Mixtral of tests/test_gguf_oracles.py (llama.cpp's converter, then its quantizer: Q8_0,
Q4_0, Q4_K_M) and 256 random tokens per seed, in one batch through both engines. Per file:
- q8 / f32: our default (llama.cpp's 8-bit activations) and fp32 activations, against
  llama.cpp's batch: argmax agreement, mean |diff|, and at each disagreement llama.cpp's own logit
  gap between its top token and ours (a near-tie when small); llama.cpp's median top-2 margin;
- llama_self: llama.cpp token by token against llama.cpp in one batch (its other kernels: the
  noise floor of its own numerics);
- decode: ours token by token (decode steps) against llama.cpp token by token (its GEMV and
  vec_dot kernels, which ours follow there);
- given_attn_norm: our run with llama.cpp's attention-norm outputs put in place of ours (read
  through cb_eval): what is left once the inputs of the key/value matmuls agree bit for bit;
- greedy: 32 greedy tokens after 16 prompt tokens, ours (decode steps) and llama.cpp's; where
  they part, llama.cpp's logit gap between its token and ours in a batch run of that step
  (negative: llama.cpp's own batch kernels pick our token there, a near-tie).
Builds the files once into FLASHMOE_TEST_CACHE (or ~/.cache/flashmoe/tests)/agreement."""
import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import gguf_oracles as G  # noqa: E402
from llama_nodes import llama_cpp_nodes  # noqa: E402

from flashmoe_plugin.runtime.engine import Engine  # noqa: E402

KINDS = ("q8_0", "q4_0", "q4_k_m")


def ids_for(n, vocab, seed):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine(path, act):
    eng = Engine(path, backend="cpu")
    eng.backend.gguf_act = act  # one backend instance serves every engine
    G.dense_in_blocks(eng)
    return eng


def compare(ours, ref):
    a, b = ours.argmax(-1), ref.argmax(-1)
    off = (a != b).nonzero().flatten().tolist()
    top2 = ref.topk(2, dim=-1).values
    return {"agree": round((a == b).float().mean().item(), 4), "bit_equal": bool(torch.equal(ours, ref)),
            "mean_abs": round((ours - ref).abs().mean().item(), 5),
            "gaps_at_disagreements": [round((ref[i, b[i]] - ref[i, a[i]]).item(), 4) for i in off],
            "median_margin": round((top2[:, 0] - top2[:, 1]).median().item(), 4)}


def llama_token_by_token(path, ids):
    _, llm = G.llama_cpp_logits(path, ids[:1])
    llm.reset()
    for t in ids:
        llm.eval([t])
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


def our_token_by_token(path, ids):
    eng = engine(path, "q8")
    out = torch.cat([eng.forward([t]) for t in ids])
    eng.close()
    return out


def given_attn_norm(path, ids, ref):
    """Ours with llama.cpp's attn_norm-i outputs substituted as the attention input of layer i."""
    nodes, _ = llama_cpp_nodes(path, ids, want=("attn_norm-",))
    eng = engine(path, "q8")
    dec, orig = eng.model, eng.model.attention

    def attention(i, x, *a):
        return orig(i, torch.from_numpy(nodes[f"attn_norm-{i}"][0]).view_as(x), *a)
    dec.attention = attention
    try:
        return compare(eng.forward(ids), ref)
    finally:
        del dec.attention
        eng.close()


def greedy(path, prompt, n=32):
    _, llm = G.llama_cpp_logits(path, prompt)
    want = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        want.append(tok)
        if len(want) == n:
            break
    eng = engine(path, "q8")
    logits, got = eng.forward(prompt)[-1], []
    for _ in range(n):
        got.append(int(logits.argmax()))
        logits = eng.forward(got[-1:])[-1]
    eng.close()
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), n)
    out = {"tokens_equal": same, "of": n}
    if same < n:  # llama.cpp's logits at the parting step (one batch): its token's over ours
        ref, _ = G.llama_cpp_logits(path, prompt + want[:same])
        out["llama_batch_gap_at_parting"] = round((ref[-1, want[same]] - ref[-1, got[same]]).item(), 4)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/devbox-gguf-q8-agreement.json")
    args = ap.parse_args()
    root = G.cache_dir() / "agreement"
    f32 = root / "model-f32.gguf"
    if not f32.is_file():
        root.mkdir(parents=True, exist_ok=True)
        G.make_gguf_model("mixtral", root)
    result = {"model": "tests/gguf_oracles.py mixtral (256 wide, 3 layers, 8 experts, top-2), llama.cpp's "
                       "converter and quantizer", "positions": args.positions, "seeds": args.seeds,
              "llama_cpp": "llama-cpp-python " + __import__("llama_cpp").__version__,
              "machine": platform.processor() or platform.machine(), "files": {}}
    for kind in KINDS:
        path = G.quantize(f32, kind)
        per_seed, first = [], {}
        for seed in args.seeds:
            eng = engine(path, "q8")
            ids = ids_for(args.positions, eng.config.vocab_size, seed)
            ref, _ = G.llama_cpp_logits(path, ids)
            row = {"seed": seed, "q8": compare(eng.forward(ids), ref)}
            eng.close()
            if seed == args.seeds[0]:
                other = engine(path, "f32")
                row["f32"] = compare(other.forward(ids), ref)
                other.close()
                steps = llama_token_by_token(path, ids)
                row["llama_self"] = compare(steps, ref)
                row["decode"] = compare(our_token_by_token(path, ids), steps)
                row["given_attn_norm"] = given_attn_norm(path, ids, ref)
                row["greedy"] = greedy(path, ids[:16])
            per_seed.append(row)
            print(kind, json.dumps(row), flush=True)
        first = per_seed[0]
        result["files"][kind] = {
            "agree_mean_over_seeds": round(sum(r["q8"]["agree"] for r in per_seed) / len(per_seed), 4),
            "agree_per_seed": [r["q8"]["agree"] for r in per_seed], **{k: first[k] for k in first if k != "seed"},
            "more_seeds": [r for r in per_seed[1:]]}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
