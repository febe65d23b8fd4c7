"""Constrained decoding (runtime/constraints.py through the sampler) on the demo model: every
output is checked by an independent judge (json + jsonschema, Python's `regex` for llama.cpp's
arithmetic grammar), never by the library that produced the mask."""
import json
from pathlib import Path

import pytest
import torch

from flashmoe_plugin.runtime.constraints import Constraint, Grammar, GrammarError

GRAMMARS = Path(__file__).parent / "data" / "grammars"   # copied from llama.cpp's grammars/ (MIT)

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"enum": ["cat", "dog", "fish"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2}},
    "required": ["name", "age", "pet"], "additionalProperties": False}




def test_response_format_json_schema_20_seeds(llm):
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    texts = set()
    for seed in range(20):
        out = llm.create_chat_completion([{"role": "user", "content": "Describe a person as JSON."}],
                                         response_format=fmt, seed=seed, temperature=1.0, max_tokens=80)
        choice = out["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        value = json.loads(choice["message"]["content"])
        jsonschema.validate(value, SCHEMA)
        texts.add(choice["message"]["content"])
    assert len(texts) > 5  # the seeds really sampled different outputs


def test_response_format_json_object_and_llama_cpp_schema_form(llm):
    out = llm.create_chat_completion([{"role": "user", "content": "Some JSON please."}],
                                     response_format={"type": "json_object"}, seed=3, max_tokens=64)
    assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict)
    # llama-cpp-python's own spelling: json_object with a schema
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    out = llm.create_chat_completion([{"role": "user", "content": "ok?"}], seed=1, max_tokens=32,
                                     response_format={"type": "json_object", "schema": schema})
    assert json.loads(out["choices"][0]["message"]["content"]) in ({"ok": True}, {"ok": False})


def test_json_gbnf_from_llama_cpp(llm):
    from llama_cpp.llama_grammar import LlamaGrammar
    grammar = LlamaGrammar.from_file(str(GRAMMARS / "json.gbnf"))
    outs = [llm("A JSON object:", grammar=grammar, max_tokens=64, seed=seed)["choices"][0] for seed in range(4)]
    # the tiny demo model may loop inside a string until max_tokens (a valid prefix, cut); the
    # outputs that end are whole JSON objects (root ::= object), and most seeds do end
    done = [o for o in outs if o["finish_reason"] == "stop"]
    assert len(done) >= 3, outs
    for o in outs:
        if o in done:
            assert isinstance(json.loads(o["text"]), dict), o
        else:
            assert o["finish_reason"] == "length" and o["text"].startswith("{"), o


def _arithmetic_regex(depth=6):
    """llama.cpp's arithmetic.gbnf as a regex, parentheses nested up to `depth`."""
    ws, num, ident = r"[ \t\n]*", r"[0-9]+[ \t\n]*", r"[a-z][a-z0-9_]*[ \t\n]*"
    term = f"(?:{ident}|{num})"
    for _ in range(depth):
        expr = f"{term}(?:[-+*/]{term})*"
        term = rf"(?:{ident}|{num}|\({ws}{expr}\){ws})"
    expr = f"{term}(?:[-+*/]{term})*"
    return f"(?:{expr}={ws}{term}\\n)+"


def test_arithmetic_gbnf_from_llama_cpp(llm):
    regex = pytest.importorskip("regex")
    pattern = regex.compile(_arithmetic_regex())
    text = (GRAMMARS / "arithmetic.gbnf").read_text()
    for seed in range(3):
        out = llm("Sums:\n", grammar=text, max_tokens=32, seed=seed)["choices"][0]["text"]
        assert out
        # the whole output is the grammar's language or (cut by max_tokens) a prefix of it
        assert pattern.fullmatch(out, partial=True), out
    assert not pattern.fullmatch("1 + = 2\n", partial=True)  # the judge can say no


def test_llama_grammar_object_string_and_ours_agree(llm):
    from llama_cpp.llama_grammar import LlamaGrammar
    text = (GRAMMARS / "json.gbnf").read_text()
    runs = [llm("Data:", grammar=g, max_tokens=24, seed=7)["choices"][0]["text"]
            for g in (text, LlamaGrammar.from_string(text), Grammar.gbnf(text))]
    assert runs[0] == runs[1] == runs[2]


def test_regex_grammar_streamed(llm):
    import re
    g = Grammar.regex(r"[0-9]{3}-[a-z]{2,4}")
    chunks = list(llm("Code:", grammar=g, max_tokens=16, seed=2, stream=True))
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_greedy_with_grammar_is_the_best_allowed_token(llm):
    """temperature 0 under a grammar picks the argmax over the allowed tokens only."""
    g = Grammar.regex("(yes|no)")
    out = llm("Is it? Answer:", grammar=g, temperature=0, max_tokens=4)["choices"][0]["text"]
    assert out in ("yes", "no")
    yes, no = (llm.tokenize(w.encode(), add_bos=False) for w in ("yes", "no"))
    llm.reset()
    llm.eval(llm.tokenize(b"Is it? Answer:"))
    row = llm.scores[llm.n_tokens - 1]
    # every one-token spelling of either word is a candidate; the better first token wins
    if len(yes) == 1 and len(no) == 1:
        assert out == ("yes" if row[yes[0]] > row[no[0]] else "no")


def test_bad_grammar_is_a_clear_error(llm):
    with pytest.raises(GrammarError, match="gbnf"):
        llm("x", grammar="root ::= (\"a\"", max_tokens=2)
    with pytest.raises(ValueError, match="response_format"):
        llm.create_chat_completion([{"role": "user", "content": "x"}], response_format={"type": "yaml"})
    with pytest.raises(TypeError, match="grammar"):
        llm("x", grammar=42, max_tokens=2)


@pytest.mark.parametrize("mode", [1, 2])
def test_mirostat_runs_and_is_seeded(llm, mode):
    a = llm("Once upon a time", mirostat_mode=mode, mirostat_tau=3.0, max_tokens=12, seed=5)
    b = llm("Once upon a time", mirostat_mode=mode, mirostat_tau=3.0, max_tokens=12, seed=5)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"]["completion_tokens"] > 0
    with pytest.raises(ValueError, match="mirostat_mode"):
        llm("x", mirostat_mode=3, max_tokens=2)


def test_mirostat_truncation_matches_llama_cpp():
    """The candidate set mirostat keeps, against llama.cpp's own sampler (no model needed: the
    low-level sampler API of llama-cpp-python on the same logits)."""
    import ctypes
    llama_cpp = pytest.importorskip("llama_cpp")
    from flashmoe_plugin.runtime.sampling import Sampler, SamplingParams
    g = torch.Generator().manual_seed(0)
    n = 512
    for mode, tau in ((2, 3.0), (2, 6.0), (1, 3.0), (1, 5.0), (1, 8.0)):
        logits = torch.randn(n, generator=g) * 3
        data = (llama_cpp.llama_token_data * n)()
        for i, x in enumerate(logits.tolist()):
            data[i].id, data[i].logit, data[i].p = i, x, 0.0
        arr = llama_cpp.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
        smpl = (llama_cpp.llama_sampler_init_mirostat_v2(1, tau, 0.1) if mode == 2
                else llama_cpp.llama_sampler_init_mirostat(n, 1, tau, 0.1, 100))
        llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
        llama_cpp.llama_sampler_free(smpl)
        ours = Sampler(SamplingParams(mirostat_mode=mode, mirostat_tau=tau, seed=0))
        probs = torch.sort(torch.softmax(logits, -1), descending=True).values
        assert ours.mirostat_keep(probs, n) == arr.size, (mode, tau)


def test_forced_tokens_are_evaluated_in_batches(llm):
    """Text the grammar forces (keys, punctuation) is not sampled token by token: it goes through
    the model in one forward pass with the sampled token before it, and greedy output is the same
    as sampling every token (a no-op logits_processor turns the fast path off)."""
    g = Grammar.json_schema(SCHEMA)
    calls = []
    forward = llm._engine.forward
    llm._engine.forward = lambda tokens, **kw: (calls.append(len(tokens)), forward(tokens, **kw))[1]
    try:
        fast = llm("Person:", grammar=g, max_tokens=80, temperature=0)
        n_fast = len(calls)
        slow = llm("Person:", grammar=g, max_tokens=80, temperature=0, logits_processor=lambda ids, x: x)
    finally:
        del llm._engine.forward
    assert fast["choices"][0]["text"] == slow["choices"][0]["text"]
    json.loads(fast["choices"][0]["text"])
    assert n_fast < fast["usage"]["completion_tokens"] // 2 < len(calls) - n_fast


def test_generate_and_sample_take_a_grammar(llm):
    from itertools import islice
    prompt = llm.tokenize(b"Numbers:")
    ids = list(islice(llm.generate(prompt, grammar=Grammar.regex("[0-9]{6}")), 3))
    assert llm.detokenize(ids).decode().isdigit()
    llm.reset()
    llm.eval(prompt)
    tok = llm.sample(grammar=Grammar.regex("(yes|no)"), temp=0)
    assert llm.detokenize([tok]).decode() in [w[:n] for w in ("yes", "no") for n in range(1, 4)]


def _demo_vocab_gguf(path):
    """The demo tokenizer as a vocab-only GGUF, so llama.cpp itself can load the same vocabulary."""
    gguf = pytest.importorskip("gguf")
    import flashmoe_plugin
    spec = json.loads((flashmoe_plugin.demo_model_path() / "tokenizer.json").read_text())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = [""] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    special = {t["id"] for t in spec["added_tokens"] if t.get("special")}
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(1)
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_feed_forward_length(64)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_eos_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return special


@pytest.mark.parametrize("name, text, exact", [
    ("json.gbnf", '{"a b": [1, -2.5e3, true, null], "c": {"d": "\u00e9t\u00e9 \\n \\u00e9"}, "e": []}', False),
    ("arithmetic.gbnf", "x = (3 +y_1)\n(a-b)/7 =  z\n", False),
    ("arithmetic.gbnf", "x = (3 +y_1)\n(a-b)/7 =  z\n", True)])
def test_gbnf_mask_equals_llama_cpp(tmp_path, name, text, exact):
    """Token by token along a valid text, the set of tokens the grammar allows is llama.cpp's own
    (its grammar sampler on the same vocabulary, loaded from a vocab-only GGUF), except for the
    11 byte tokens 0xF5-0xFF, which are never valid UTF-8: llama.cpp's partial-UTF-8 decoder
    lets them start a string character, llguidance does not. At the end both allow EOS, except
    where llguidance's greedy lexer tokens differ (arithmetic's `z\\n`: see Grammar.gbnf), which
    exact=True removes."""
    import ctypes

    import numpy as np

    import flashmoe_plugin
    from flashmoe_plugin.runtime.tokenizer import Tokenizer
    llama_cpp = pytest.importorskip("llama_cpp")
    special = _demo_vocab_gguf(tmp_path / "vocab.gguf")
    model = llama_cpp.Llama(str(tmp_path / "vocab.gguf"), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(model.model)
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    tok = Tokenizer.from_folder(flashmoe_plugin.demo_model_path())
    grammar = (GRAMMARS / name).read_text()
    theirs = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    ours = Constraint(Grammar.gbnf(grammar, exact=exact), tok, n)
    data = (llama_cpp.llama_token_data * n)()
    rows = np.ctypeslib.as_array(data)
    never_utf8 = np.array([len(b) == 1 and b[0] >= 0xF5 for b in (tok.token_bytes(i) for i in range(n))])
    compared = ~never_utf8 & ~np.isin(np.arange(n), sorted(special))

    def llama_cpp_allowed():
        rows["id"], rows["logit"], rows["p"] = np.arange(n), 0.0, 0.0
        arr = llama_cpp.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(theirs, ctypes.byref(arr))
        allowed = np.zeros(n, dtype=bool)
        allowed[rows["id"]] = np.isfinite(rows["logit"])
        return allowed

    try:
        ids = tok.encode(text, add_bos=False)
        for t in ids:
            a, b = ours.allowed(), llama_cpp_allowed()
            assert (a == b)[compared].all(), [tok.token_bytes(i) for i in np.flatnonzero((a != b) & compared)][:8]
            assert a[t] and b[t]
            ours.accept(t)
            llama_cpp.llama_sampler_accept(theirs, t)
        assert llama_cpp_allowed()[0]  # complete: llama.cpp allows EOS
        greedy_gap = name == "arithmetic.gbnf" and not exact  # the ident's `ws` ate the final newline
        assert ours.allowed()[0] != greedy_gap
    finally:
        llama_cpp.llama_sampler_free(theirs)
        model.close()
