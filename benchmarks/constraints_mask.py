"""Cost of the grammar mask per token on a large vocabulary, for the libraries we could use.

    python benchmarks/constraints_mask.py VOCAB.gguf [--json OUT] [--steps 200]

VOCAB.gguf: a vocab-only GGUF, e.g. the Qwen2 BPE vocabulary (151,936 tokens) that the
llama-cpp-python sdist ships as vendor/llama.cpp/models/ggml-vocab-qwen2.gguf. For each library
and grammar it walks a fixed valid text token by token (the text's own tokens, as a model that
always picks an allowed token would) and times computing the mask over the whole vocabulary
before each step, plus the one-off setup (tokenizer import, grammar compile). flashmoe uses
llguidance (runtime/constraints.py); xgrammar is measured when installed.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]}},
    "required": ["name", "age", "tags", "address"]}
SCHEMA_TEXT = ('{"name": "Ada Lovelace, Countess of Lovelace", "age": 36, "tags": ["mathematician", "writer", '
               '"analyst"], "address": {"city": "London", "zip": "12345"}}')
GBNF_JSON_TEXT = '{"items": [1, 2.5, -3e4, {"a": "b c", "d": [true, false, null]}], "note": "' + "word " * 30 + '"}'


def load_vocab(path):
    """(token bytes list, special ids, eos id, encode function) from a vocab-only GGUF."""
    import gguf
    from flashmoe_plugin.runtime.tokenizer import _byte_decoder
    r = gguf.GGUFReader(path)
    f = r.fields
    toks = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode("utf-8") for i in f["tokenizer.ggml.tokens"].data]
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    eos = int(f["tokenizer.ggml.eos_token_id"].parts[-1][0])
    dec = _byte_decoder()
    out, special = [], []
    for i, (t, ty) in enumerate(zip(toks, types)):
        if ty == 3:  # control
            special.append(i)
            out.append(t.encode())
        else:
            out.append(bytes(dec[c] for c in t) if all(c in dec for c in t) else t.encode())
    return out, special, eos


class VocabTokenizer:
    """The runtime Tokenizer's interface over a plain token list (greedy longest-match encode:
    good enough to walk a text token by token)."""

    def __init__(self, tokens, special, eos):
        self.tokens, self.special_ids, self.eos_id, self.bos_id = tokens, set(special), eos, None
        self._index = {t: i for i, t in enumerate(tokens) if i not in self.special_ids}
        self._max = max(len(t) for t in tokens)

    def token_bytes(self, i, special=False):
        t = self.tokens[i]
        return (t if special else b"") if i in self.special_ids else t

    def encode(self, text, add_bos=False, special=False):
        b = text.encode() if isinstance(text, str) else text
        ids, i = [], 0
        while i < len(b):
            for n in range(min(self._max, len(b) - i), 0, -1):
                j = self._index.get(b[i:i + n])
                if j is not None:
                    ids.append(j)
                    i += n
                    break
            else:
                raise ValueError(f"cannot encode byte {b[i]}")
        return ids


def bench_llguidance(tok, n_vocab, grammar, text, steps):
    from flashmoe_plugin.runtime.constraints import Constraint, _ll_tokenizer
    t0 = time.perf_counter()
    _ll_tokenizer(tok, n_vocab)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    c = Constraint(grammar, tok, n_vocab)
    t_compile = time.perf_counter() - t0
    import torch
    ids = tok.encode(text)[:steps]
    times, applied, allowed = [], [], []
    logits = torch.zeros(n_vocab)
    for t in ids:
        s = time.perf_counter()
        ok = c.allowed()
        times.append(time.perf_counter() - s)
        logits.zero_()
        s = time.perf_counter()
        c.mask(logits)  # what the sampler pays per token: the mask computed and applied to a logits row
        applied.append(time.perf_counter() - s)
        allowed.append(int(ok.sum()))
        assert ok[t], f"llguidance forbids token {t} of the valid text"
        c.accept(t)
    return dict(setup_tokenizer_s=t_tok, compile_s=t_compile, **_summary(times),
                sampler_us_median=statistics.median(applied) * 1e6, allowed_median=int(np.median(allowed)))


def bench_xgrammar(tok, n_vocab, kind, source, text, steps):
    import torch
    import xgrammar as xgr
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo([tok.token_bytes(i) if i not in tok.special_ids else b"" for i in range(n_vocab)],
                             vocab_type=xgr.VocabType.RAW, vocab_size=n_vocab, stop_token_ids=[tok.eos_id])
    compiler = xgr.GrammarCompiler(info)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = (compiler.compile_json_schema(source) if kind == "json_schema" else compiler.compile_grammar(source))
    t_compile = time.perf_counter() - t0
    m = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, n_vocab)
    times = []
    for t in tok.encode(text)[:steps]:
        s = time.perf_counter()
        m.fill_next_token_bitmask(bitmask)
        ok = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:n_vocab]
        times.append(time.perf_counter() - s)
        assert ok[t], f"xgrammar forbids token {t} of the valid text"
        assert m.accept_token(t)
    del torch
    return dict(setup_tokenizer_s=t_tok, compile_s=t_compile, **_summary(times))


def _summary(times):
    us = [t * 1e6 for t in times]
    return dict(steps=len(us), mask_us_median=statistics.median(us), mask_us_mean=statistics.fmean(us),
                mask_us_p90=float(np.percentile(us, 90)), mask_us_max=max(us))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("vocab")
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    from flashmoe_plugin.runtime.constraints import Grammar
    tokens, special, eos = load_vocab(a.vocab)
    tok = VocabTokenizer(tokens, special, eos)
    n = len(tokens)
    gbnf = open(__file__.replace("benchmarks/constraints_mask.py", "tests/data/grammars/json.gbnf")).read()
    cases = {"json_schema": (Grammar.json_schema(SCHEMA), json.dumps(SCHEMA), SCHEMA_TEXT),
             "gbnf_json": (Grammar.gbnf(gbnf), gbnf, GBNF_JSON_TEXT)}
    res = {"vocab": a.vocab.rsplit("/", 1)[-1], "n_vocab": n, "machine": platform.processor() or platform.machine(),
           "note": "shared 2-core machine: timings are noisy", "results": {}}
    for name, (g, src, text) in cases.items():
        res["results"][f"llguidance/{name}"] = bench_llguidance(tok, n, g, text, a.steps)
        try:
            import xgrammar  # noqa: F401
        except ImportError:
            continue
        try:
            res["results"][f"xgrammar/{name}"] = bench_xgrammar(tok, n, g.kind, src, text, a.steps)
        except Exception as e:  # a grammar one library rejects is a result too
            res["results"][f"xgrammar/{name}"] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(res, indent=1))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
