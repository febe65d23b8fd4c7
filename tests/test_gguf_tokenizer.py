"""The GGUF vocabulary tokenizes as llama.cpp does: the .inp/.out pairs llama.cpp ships with its
vocab GGUFs (vendor/llama.cpp/models/ in the llama-cpp-python sdist; tests/test-tokenizer-0 there
tokenizes with add_special=false, parse_special=false)."""
import pytest

pytest.importorskip("gguf")
import gguf_oracles as G  # noqa: E402

from flashmoe_plugin.runtime.gguf_tokenizer import write_folder  # noqa: E402
from flashmoe_plugin.runtime.tokenizer import Tokenizer  # noqa: E402
from flashmoe_plugin.store.gguf import GgufStore, _field_value, _reader  # noqa: E402

VOCABS = ["llama-spm", "llama-bpe", "qwen2", "gpt-2"]


def cases(path):
    raw = path.with_name(path.name + ".inp").read_bytes().decode()
    inp = raw.split("\n__ggml_vocab_test__\n")
    if inp and inp[-1] == "":
        inp = inp[:-1]
    out = path.with_name(path.name + ".out").read_text().split("\n")
    return list(zip(inp, out))


@pytest.mark.parametrize("name", VOCABS)
def test_tokenization_matches_llama_cpp(name, tmp_path):
    try:
        path = G.vocab_gguf(name)
    except OSError as e:
        pytest.skip(f"llama-cpp-python sdist not reachable: {e}")
    meta = {k: _field_value(f) for k, f in _reader(path).fields.items() if not k.startswith("GGUF.")}
    tok = Tokenizer.from_folder(write_folder(meta, tmp_path / "tok", str(path)))
    pairs = cases(path)
    assert len(pairs) > 20
    bad = []
    for text, want in pairs:
        got = tok.encode(text, add_bos=False, special=False)
        if got != [int(t) for t in want.split()]:
            bad.append((text, got, want))
    assert not bad, f"{len(bad)} of {len(pairs)} differ, first: {bad[0]!r}"
    # and back: the tokens' bytes are the text (SPM: with the space llama.cpp prefixes)
    for text, want in pairs:
        if want.strip():
            assert tok.decode([int(t) for t in want.split()]) == ((" " if name == "llama-spm" else "") + text).encode()
