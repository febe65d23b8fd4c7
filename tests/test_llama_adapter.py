"""The `Llama` drop-in (adapters/llama_cpp.py) against llama-cpp-python's contract and the HF oracle.

Dict shapes are checked key by key, recursively, against llama-cpp-python's own TypedDicts
(`llama_cpp.llama_types`); numbers against a transformers model with the same weights."""
import os
import typing
from itertools import islice

import numpy as np
import pytest
import torch

from flashmoe_plugin.adapters.llama_cpp import Llama, LogitsProcessorList, StoppingCriteriaList

FAMILY = "qwen3_moe"
PROMPT = "Once upon a time there was a small model"
ATOL = 1e-4


def _require(module: str):
    """CI installs llama-cpp-python, so there a missing one fails; locally it skips with a reason."""
    if os.environ.get("CI") or os.environ.get("FLASHMOE_REQUIRE_LLAMA_CPP"):
        import importlib
        return importlib.import_module(module)
    return pytest.importorskip(module, reason="llama-cpp-python is not installed here (CI installs it)")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: one torch thread is faster, and on a busy 2-core CI box it avoids
    oversubscription (measured here: 29 s instead of 68-100 s for this file under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def oracle(oracles):
    return oracles(FAMILY)


@pytest.fixture(scope="module")
def store(oracle):
    return str(oracle.store("none"))


@pytest.fixture(scope="module")
def llm(store):
    with Llama(model_path=store, n_ctx=256, seed=1234, verbose=False) as m:
        yield m


@pytest.fixture(scope="module")
def llm_all(store):
    with Llama(model_path=store, n_ctx=256, logits_all=True, verbose=False) as m:
        yield m


@pytest.fixture(scope="module")
def types():
    return _require("llama_cpp.llama_types")


# ---------------------------------------------------------------------- a TypedDict checker
def conforms(value, tp, path="$"):
    """Assert that `value` is exactly of type `tp` (TypedDicts: required keys present, no keys
    outside the TypedDict, every value of its declared type, recursively)."""
    from typing_extensions import Literal as XLiteral, is_typeddict

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return
    if is_typeddict(tp):
        assert isinstance(value, dict), f"{path}: {type(value).__name__}, expected a dict ({tp.__name__})"
        hints = typing.get_type_hints(tp)
        missing = set(tp.__required_keys__) - set(value)
        extra = set(value) - set(hints)
        assert not missing, f"{path}: missing required keys {sorted(missing)} of {tp.__name__}"
        assert not extra, f"{path}: keys {sorted(extra)} are not in {tp.__name__}"
        for k, v in value.items():
            conforms(v, hints[k], f"{path}.{k}")
    elif origin is typing.Union:
        errors = []
        for alt in args:
            try:
                conforms(value, alt, path)
                return
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{path}: {value!r} matches none of {tp}: {errors}")
    elif origin in (typing.Literal, XLiteral):
        assert value in args, f"{path}: {value!r} not one of {args}"
    elif origin is list:
        assert isinstance(value, list), f"{path}: {type(value).__name__}, expected a list"
        for i, v in enumerate(value):
            conforms(v, args[0], f"{path}[{i}]")
    elif origin is dict:
        assert isinstance(value, dict), f"{path}: {type(value).__name__}, expected a dict"
        for k, v in value.items():
            conforms(k, args[0], f"{path}.key")
            conforms(v, args[1], f"{path}[{k!r}]")
    elif tp is type(None):
        assert value is None, f"{path}: {value!r}, expected None"
    elif tp in (int, float, str, bool):
        ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
        assert ok, f"{path}: {value!r} ({type(value).__name__}), expected {tp.__name__}"
    else:
        raise AssertionError(f"{path}: the checker does not know the type {tp!r}")


def test_checker_rejects_wrong_shapes(types):
    good = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    conforms(good, types.CompletionUsage)
    for bad in ({**good, "extra": 1}, {"prompt_tokens": 1, "completion_tokens": 2},
                {**good, "total_tokens": "3"}, {**good, "total_tokens": 3.0}):
        with pytest.raises(AssertionError):
            conforms(bad, types.CompletionUsage)


# ---------------------------------------------------------------------- dict shapes
def test_completion_shapes(llm, types):
    for out in (llm(PROMPT, max_tokens=6), llm.create_completion(PROMPT, max_tokens=6, stream=False),
                llm.create_completion(llm.tokenize(PROMPT.encode()), max_tokens=6, temperature=0)):
        conforms(out, types.CreateCompletionResponse)
        assert out["id"].startswith("cmpl-") and out["object"] == "text_completion"
        assert out["model"] == llm.model_path
        (choice,) = out["choices"]
        conforms(choice, types.CompletionChoice)
        conforms(out["usage"], types.CompletionUsage)
        u = out["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        assert choice["index"] == 0 and choice["logprobs"] is None


def test_completion_logprobs_shape(llm, types):
    out = llm(PROMPT, max_tokens=5, logprobs=3, temperature=0)
    conforms(out, types.CreateCompletionResponse)
    lp = out["choices"][0]["logprobs"]
    conforms(lp, types.CompletionLogprobs)
    assert len(lp["tokens"]) == out["usage"]["completion_tokens"] == 5
    for value, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and len(top) >= 1 and max(top.values()) >= value
    echoed = llm(PROMPT, max_tokens=3, logprobs=2, echo=True, temperature=0)["choices"][0]["logprobs"]
    conforms(echoed, types.CompletionLogprobs)
    assert echoed["token_logprobs"][0] is None and echoed["top_logprobs"][0] is None


def test_completion_stream_shapes(llm, types):
    chunks = list(llm(PROMPT, max_tokens=8, stream=True))
    assert len(chunks) >= 2
    for c in chunks:
        conforms(c, types.CreateCompletionStreamResponse)
        assert "usage" not in c
        assert c["id"] == chunks[0]["id"] and c["created"] == chunks[0]["created"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"][0]["text"] == ""
    lp_chunks = list(llm.create_completion(PROMPT, max_tokens=4, stream=True, logprobs=2))
    for c in lp_chunks:
        conforms(c, types.CreateCompletionStreamResponse)


def test_chat_shapes(llm, types):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello experts"}]
    out = llm.create_chat_completion(messages, max_tokens=6)
    conforms(out, types.CreateChatCompletionResponse)
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    (choice,) = out["choices"]
    conforms(choice, types.ChatCompletionResponseChoice)
    conforms(choice["message"], types.ChatCompletionResponseMessage)
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    conforms(out["usage"], types.CompletionUsage)
    with_lp = llm.create_chat_completion(messages, max_tokens=4, logprobs=True, top_logprobs=2)
    conforms(with_lp, types.CreateChatCompletionResponse)
    conforms(with_lp["choices"][0]["logprobs"], types.ChatCompletionLogprobs)


def test_chat_stream_shapes(llm, types):
    messages = [{"role": "user", "content": "Hello experts"}]
    chunks = list(llm.create_chat_completion(messages, max_tokens=6, stream=True))
    for c in chunks:
        conforms(c, types.CreateChatCompletionStreamResponse)
        (choice,) = c["choices"]
        conforms(choice, types.ChatCompletionStreamResponseChoice)
        assert c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"]
        assert c["id"].startswith("chatcmpl-")
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant"}
    assert deltas[-1] == {} and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(set(d) == {"content"} for d in deltas[1:-1])
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    whole = llm.create_chat_completion(messages, max_tokens=6, temperature=0)
    again = "".join(c["choices"][0]["delta"].get("content", "")
                    for c in llm.create_chat_completion(messages, max_tokens=6, temperature=0, stream=True))
    assert again == whole["choices"][0]["message"]["content"]


# ---------------------------------------------------------------------- against transformers
def hf_greedy(oracle, ids, n):
    with torch.no_grad():
        out = oracle.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def test_greedy_equals_transformers(llm, oracle):
    ids = llm.tokenize(PROMPT.encode())
    ref = hf_greedy(oracle, ids, 8)
    assert list(islice(llm.generate(ids, temp=0), 8)) == ref
    eos = llm.token_eos()
    ref_cut = ref[:ref.index(eos)] if eos in ref else ref
    out = llm(PROMPT, max_tokens=8, temperature=0)
    assert out["choices"][0]["text"] == llm.detokenize(ref_cut).decode("utf-8", errors="ignore")
    assert out["usage"]["completion_tokens"] == len(ref_cut)
    assert out["choices"][0]["finish_reason"] == ("stop" if eos in ref else "length")


def test_eval_scores_equal_transformer_logits(llm_all, llm, oracle):
    ids = llm_all.tokenize(PROMPT.encode())
    with torch.no_grad():
        ref = oracle.model(torch.tensor([ids])).logits[0].float().numpy()
    m = llm_all
    m.reset()
    m.eval(ids[:5])
    m.eval(ids[5:])
    assert m.n_tokens == len(ids) and m.input_ids[: m.n_tokens].tolist() == ids
    assert m.scores.shape == (m.n_ctx(), m.n_vocab()) and m.scores.dtype == np.float32
    np.testing.assert_allclose(m.scores[: len(ids)], ref, atol=ATOL, rtol=0)
    # without logits_all the last row is kept: sample() and the scores row agree with transformers
    llm.reset()
    llm.eval(ids)
    np.testing.assert_allclose(llm.scores[llm.n_tokens - 1], ref[-1], atol=ATOL, rtol=0)
    assert llm.sample(temp=0) == int(ref[-1].argmax())


# ---------------------------------------------------------------------- sampling semantics
def test_seed_reproducible(llm, store):
    a = llm(PROMPT, max_tokens=16, temperature=1.0, seed=7)["choices"][0]["text"]
    b = llm(PROMPT, max_tokens=16, temperature=1.0, seed=7)["choices"][0]["text"]
    c = llm(PROMPT, max_tokens=16, temperature=1.0, seed=8)["choices"][0]["text"]
    assert a == b and a != c
    # llama-cpp-python's seed chain: two objects with the same constructor seed agree call by call
    # (llama.cpp-only options are accepted and ignored, as llama-cpp-python does with unknown ones)
    with Llama(store, n_ctx=128, seed=42, verbose=False) as x, \
            Llama(store, n_ctx=128, seed=42, verbose=False, n_gpu_layers=-1, use_mmap=False, type_k=0,
                  flash_attn=True, no_such_option=1) as y:
        assert [x(PROMPT, max_tokens=8)["choices"][0]["text"] for _ in range(2)] == \
               [y(PROMPT, max_tokens=8)["choices"][0]["text"] for _ in range(2)]


def test_stop_strings(llm):
    no_eos = {llm.token_eos(): -1e4}
    ids = llm.tokenize(PROMPT.encode())
    raw = llm.detokenize(list(islice(llm.generate(ids, temp=0, logit_bias=no_eos), 12)))
    full = llm(PROMPT, max_tokens=12, temperature=0, logit_bias=no_eos)["choices"][0]["text"]
    assert full == raw.decode("utf-8", errors="ignore")
    # a 3-byte printable ASCII stop string from the second half of the greedy text
    i = next(i for i in range(len(raw) // 2, len(raw) - 2) if all(32 <= b < 127 for b in raw[i:i + 3]))
    stop = raw[i:i + 3].decode()
    want = raw[: raw.find(stop.encode())].decode("utf-8", errors="ignore")
    out = llm(PROMPT, max_tokens=12, temperature=0, logit_bias=no_eos, stop=[stop, "\x00never"])
    assert out["choices"][0]["text"] == want and out["choices"][0]["finish_reason"] == "stop"
    chunks = list(llm(PROMPT, max_tokens=12, temperature=0, logit_bias=no_eos, stop=stop, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    streamed = llm(PROMPT, max_tokens=12, temperature=0, logit_bias=no_eos, stream=True)
    assert "".join(c["choices"][0]["text"] for c in streamed) == full


def test_echo_and_token_list_prompt(llm):
    plain = llm(PROMPT, max_tokens=6, temperature=0)
    echoed = llm(PROMPT, max_tokens=6, temperature=0, echo=True)
    assert echoed["choices"][0]["text"] == PROMPT + plain["choices"][0]["text"]
    ids = llm.tokenize(PROMPT.encode("utf-8"), add_bos=True, special=True)  # as llama_chat_format does
    from_ids = llm.create_completion(prompt=ids, max_tokens=6, temperature=0)
    assert from_ids["choices"][0]["text"] == plain["choices"][0]["text"]
    assert from_ids["usage"]["prompt_tokens"] == len(ids) == plain["usage"]["prompt_tokens"]


def test_logit_bias_logits_processor_stopping_criteria(llm):
    target = llm.tokenize(b" hello", add_bos=False)[-1]
    out = llm(PROMPT, max_tokens=4, temperature=0, logit_bias={target: 1e4}, logprobs=0)
    assert out["choices"][0]["text"] == llm.detokenize([target] * 4).decode()

    def force(input_ids, scores):
        scores = np.full_like(scores, -np.inf)
        scores[target] = 0.0
        return scores
    out = llm(PROMPT, max_tokens=3, temperature=0.9, logits_processor=LogitsProcessorList([force]))
    assert out["choices"][0]["text"] == llm.detokenize([target] * 3).decode()
    n_prompt = len(llm.tokenize(PROMPT.encode()))
    out = llm(PROMPT, max_tokens=10, temperature=0,
              stopping_criteria=StoppingCriteriaList([lambda ids, logits: len(ids) >= n_prompt + 3]))
    assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == 2


def test_max_tokens_until_context_and_overflow(store):
    with Llama(store, n_ctx=24, verbose=False) as small:
        ids = small.tokenize(PROMPT.encode())
        for n in (None, 0, -1):
            out = small(PROMPT, max_tokens=n, temperature=0, logit_bias={small.token_eos(): -1e4})
            assert out["usage"]["total_tokens"] == small.n_ctx()
            assert out["choices"][0]["finish_reason"] == "length"
        long = " ".join([PROMPT] * 4)
        n = len(small.tokenize(long.encode()))
        with pytest.raises(ValueError, match=rf"Requested tokens \({n}\) exceed context window of 24"):
            small(long)
        with pytest.raises(ValueError, match="exceed context window"):
            small(long, stream=True)  # raised at the call, not at the first chunk
        with pytest.raises(ValueError):
            small.eval(list(range(3, 30)))
        assert len(ids) < 24


# ---------------------------------------------------------------------- low-level API
def test_construction(llm, store, tmp_path):
    import flashmoe_plugin
    assert flashmoe_plugin.Llama is Llama
    with pytest.raises(ValueError, match="Model path does not exist"):
        Llama(str(tmp_path / "nope"), verbose=False)
    half = llm._engine.store.expert_bytes // 2
    m = Llama(store, n_ctx=0, ram_budget=half, cache_policy="lru", verbose=False)
    assert m.n_ctx() == int(m.metadata["qwen3moe.context_length"])  # 0 = the model's training context
    out = m(PROMPT, max_tokens=6, temperature=0)
    assert out == {**out, "choices": llm(PROMPT, max_tokens=6, temperature=0)["choices"]}  # budget changes nothing
    assert m.pager_stats["evictions"] > 0
    m.close()
    m.close()
    with pytest.raises(RuntimeError, match="closed"):
        m("x")


def test_tokenize_detokenize(llm):
    for text in (b"Hello world, hello experts.", b"The quick brown fox\njumps", "caf\u00e9 \u2603".encode()):
        assert llm.detokenize(llm.tokenize(text, add_bos=False)) == text
    special = llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
    assert special == [llm.token_eos()]
    assert len(llm.tokenize(b"<|im_end|>", add_bos=False, special=False)) > 1
    assert llm.detokenize(special) == b"" and llm.detokenize(special, special=True) == b"<|im_end|>"
    assert llm.n_vocab() == 384 and llm.n_embd() == 64 and llm.token_bos() == 0
    md = llm.metadata
    assert md["general.architecture"] == "qwen3moe" and md["qwen3moe.expert_count"] == "8"
    assert "tokenizer.chat_template" in md and all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    assert {"hits", "misses", "bytes_read", "hit_rate"} <= set(llm.pager_stats)


def test_generate_reuses_cached_prefix(llm):
    evaluated = []
    forward = llm._engine.forward

    def spy(tokens, last_only=False):
        evaluated.append(list(tokens))
        return forward(tokens, last_only=last_only)

    ids = llm.tokenize(PROMPT.encode())
    llm.reset()
    llm._engine.forward = spy
    try:
        first = list(islice(llm.generate(ids, temp=0), 3))
        assert evaluated[0] == ids and llm.n_tokens == len(ids) + 2
        evaluated.clear()
        more = ids + first  # a continuation of what is cached: only the new tail is evaluated
        nxt = list(islice(llm.generate(more, temp=0), 1))
        assert evaluated[0] == first[2:] and llm._engine.tokens == more
        evaluated.clear()
        again = list(islice(llm.generate(more, temp=0), 1))  # exactly cached: nothing re-evaluated
        assert evaluated == [] and again == nxt
        evaluated.clear()
        other = ids[:4] + [ids[4] + 1] + ids[5:]
        list(islice(llm.generate(other, temp=0), 1))
        assert evaluated[0] == other[4:] and llm._engine.tokens == other
    finally:
        del llm._engine.forward
    assert llm._engine.forward == forward


def test_save_and_load_state(llm):
    ids = llm.tokenize(PROMPT.encode())
    llm.reset()
    llm.eval(ids)
    state = llm.save_state()
    a = list(islice(llm.generate(ids + [5], temp=0, reset=True), 6))
    llm.reset()
    llm.eval(llm.tokenize(b"something else entirely", add_bos=False))
    llm.load_state(state)
    assert llm.n_tokens == len(ids) and llm._engine.tokens == ids
    b = list(islice(llm.generate(ids + [5], temp=0), 6))
    assert a == b


def test_hooks_receive_stats(llm):
    from flashmoe_plugin.hookspecs import hookimpl
    from flashmoe_plugin.plugins import manager

    class Recorder:
        def __init__(self):
            self.tokens, self.ends = [], []

        @hookimpl
        def on_token(self, stats):
            self.tokens.append(stats)

        @hookimpl
        def on_generation_end(self, stats):
            self.ends.append(stats)

    rec = Recorder()
    manager().register(rec, "test-recorder")
    try:
        out = llm(PROMPT, max_tokens=5, temperature=0, logit_bias={llm.token_eos(): -1e4})
        stream = llm(PROMPT, max_tokens=50, temperature=0, stream=True, logit_bias={llm.token_eos(): -1e4})
        next(stream), next(stream)
        stream.close()  # an abandoned stream still reports its end
    finally:
        manager().unregister(rec)
    assert len(rec.ends) == 2 and rec.ends[1]["finish_reason"] is None
    rec.tokens, rec.ends = rec.tokens[:5], rec.ends[:1]
    assert len(rec.tokens) == 5 and len(rec.ends) == 1
    assert {"token", "hits", "misses", "bytes_read", "seconds"} <= set(rec.tokens[0])
    end = rec.ends[0]
    assert end["completion_tokens"] == out["usage"]["completion_tokens"] == 5
    assert end["prompt_tokens"] == out["usage"]["prompt_tokens"] and end["finish_reason"] == "length"


def test_llama_cpp_chat_handler_drives_us(llm):
    """llama-cpp-python's own Jinja2 chat handler (tokenize special=True, then create_completion
    with a token list and a stopping criterion) works on our object and agrees with ours."""
    fmt = _require("llama_cpp.llama_chat_format")
    handler = fmt.Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>",
                                      bos_token="<|endoftext|>", stop_token_ids=[llm.token_eos()]).to_chat_handler()
    messages = [{"role": "user", "content": "Hello experts"}]
    theirs = handler(llama=llm, messages=messages, max_tokens=6, temperature=0, repeat_penalty=1.0)
    ours = llm.create_chat_completion(messages, max_tokens=6, temperature=0)
    assert theirs["choices"][0]["message"] == ours["choices"][0]["message"]
    assert theirs["usage"] == ours["usage"]


def test_llama_cpp_code_paths_accept_us(llm):
    """llama-cpp-python's server calls the unbound llama_cpp.Llama methods on the model object when
    streaming, and its prompt caches call save_state/load_state: both work on ours."""
    llama_cpp = _require("llama_cpp")
    want = llm(PROMPT, max_tokens=5, temperature=0)["choices"][0]["text"]
    chunks = list(llama_cpp.Llama.__call__(llm, PROMPT, max_tokens=5, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    chat = list(llama_cpp.Llama.create_chat_completion(llm, [{"role": "user", "content": "hi"}], max_tokens=3,
                                                       temperature=0, stream=True))
    assert chat[0]["choices"][0]["delta"] == {"role": "assistant"} and chat[-1]["choices"][0]["delta"] == {}
    llm.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=1 << 26))
    try:
        assert llm(PROMPT, max_tokens=5, temperature=0)["choices"][0]["text"] == want
        llm.reset()
        assert llm(PROMPT, max_tokens=5, temperature=0)["choices"][0]["text"] == want
    finally:
        llm.set_cache(None)
