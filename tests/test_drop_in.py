"""The rest of llama-cpp-python's surface (adapters/surface.py, adapters/tokenizer.py): third-party
code that wraps a `llama_cpp.Llama` (outlines) wraps ours unchanged; embeddings; from_pretrained."""
import json
import math

import pytest
import torch




def test_tokenizer_object(llm):
    tok = llm.tokenizer()
    assert tok is llm.tokenizer_
    ids = tok.tokenize(b"<|im_start|>hello world")  # special=True by default, as LlamaTokenizer
    assert ids == llm.tokenize(b"<|im_start|>hello world", special=True)
    assert tok.encode("hello world") == llm.tokenize(b"hello world", special=True)
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.detokenize(ids) == llm.detokenize(ids)


def test_hf_tokenizer_matches_ours(llm):
    pytest.importorskip("transformers")
    hf = llm.tokenizer_.hf_tokenizer
    text = "The quick brown fox, 42 times."
    assert hf.encode(text, add_special_tokens=False) == llm.tokenize(text.encode(), add_bos=False)
    assert hf.eos_token_id == llm.token_eos()
    assert len(hf.get_vocab()) == llm.n_vocab()


def test_outlines_wraps_us_unchanged_and_yields_schema_valid_json(llm):
    outlines = pytest.importorskip("outlines")
    pytest.importorskip("numba", reason="outlines' numpy kernels (llama.cpp models) need numba")
    jsonschema = pytest.importorskip("jsonschema")
    from outlines.types import JsonSchema
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "pet": {"enum": ["cat", "dog"]}},
              "required": ["name", "pet"], "additionalProperties": False}
    model = outlines.from_llamacpp(llm)
    for seed in range(3):
        text = model("Describe a pet owner as JSON.", JsonSchema(json.dumps(schema), whitespace_pattern=r"[ ]?"),
                     max_tokens=60, seed=seed)
        jsonschema.validate(json.loads(text), schema)


def test_create_chat_completion_openai_v1(llm):
    openai = pytest.importorskip("openai")
    msgs = [{"role": "user", "content": "hi"}]
    out = llm.create_chat_completion_openai_v1(msgs, max_tokens=4, seed=1)
    assert isinstance(out, openai.types.chat.ChatCompletion)
    assert out.choices[0].message.content == llm.create_chat_completion(msgs, max_tokens=4, seed=1)[
        "choices"][0]["message"]["content"]
    chunks = list(llm.create_chat_completion_openai_v1(msgs, max_tokens=4, seed=1, stream=True))
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)


def test_embeddings(llm):
    out = llm.create_embedding(["hello world", "a cat"])
    assert out["object"] == "list" and out["model"] == llm.model_path
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == llm.n_embd() for d in out["data"])
    n_tokens = len(llm.tokenize(b"hello world")) + len(llm.tokenize(b"a cat"))
    assert out["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
    assert llm.embed("hello world") == out["data"][0]["embedding"]
    unit = llm.embed("a cat", normalize=True)
    assert math.isclose(sum(x * x for x in unit), 1.0, rel_tol=1e-5)
    assert llm.n_tokens == 0  # the context is reset, as llama-cpp-python does


def test_embedding_is_the_state_the_logits_come_from(llm):
    """For one token, the (mean-pooled) embedding times the output head is the model's logits."""
    tok = llm.tokenize(b" the", add_bos=False)
    assert len(tok) == 1 and not llm._tok.add_bos  # one token, no BOS: embed sees exactly it
    emb = torch.tensor(llm.embed(" the"))
    llm.reset()
    llm.eval(tok)
    logits = torch.from_numpy(llm.scores[0].copy())
    head = llm._engine.model.lm_head.float()
    torch.testing.assert_close(head @ emb, logits, atol=2e-2, rtol=1e-2)


def test_from_pretrained_local_only(tmp_path):
    import flashmoe_plugin
    from flashmoe_plugin import Llama
    store = flashmoe_plugin.demo_model_path()
    with Llama.from_pretrained(str(store), verbose=False, n_ctx=64) as m:
        assert m.model_path == str(store)
    with Llama.from_pretrained(str(store.parent), filename="store", verbose=False, n_ctx=64) as m:
        assert m.model_path == str(store)
    with pytest.raises(ValueError, match="not a local path"):
        Llama.from_pretrained("Qwen/Qwen3-30B-A3B-GGUF", filename="*q4_k_m.gguf")
    with pytest.raises(ValueError, match="No file found"):
        Llama.from_pretrained(str(store.parent), filename="*.gguf")


def test_isinstance_llama_cpp_llama_is_false():
    """Documented in the README: same interface, not a subclass (llama_cpp.Llama needs a GGUF
    loaded by llama.cpp in its constructor)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from flashmoe_plugin import Llama
    assert not issubclass(Llama, llama_cpp.Llama)
