"""Decode pipelined by one token (runtime/pipelined.py), on the CPU twin of the whole-token step:
the same logic the GPU runs (the next step queued before this one's token is read, the token
chosen by torch ops after the step, a miss voiding the speculative step), uncaptured.

Oracle: the unpipelined loop (FLASHMOE_PIPELINE=0: today's generate.tokens over Engine.forward)
on a fresh engine of the same store: the same tokens, the same cached tokens after a stop, the
same next logits (torch.equal: the speculative step's KV position is overwritten), the same hits
and misses counted."""
import numpy as np
import pytest
import torch

from flashmoe_plugin import demo_model_path
from flashmoe_plugin.runtime import pipelined
from flashmoe_plugin.runtime.engine import ContextError, Engine
from flashmoe_plugin.runtime.generate import complete, tokens
from flashmoe_plugin.runtime.sampling import Sampler, SamplingParams

GREEDY = SamplingParams(temperature=0)
DEFAULTS = SamplingParams(seed=3)  # llama-cpp-python's: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05
FULL = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1)  # `flashmoe bench`'s


def _engine(warm=False, n_ctx=256):
    e = Engine(demo_model_path(), decode_graph="on", prefetch="off", n_ctx=n_ctx)
    if warm:  # every expert resident: no step misses
        for layer, info in e.store.layers.items():
            e.pager.acquire(layer, list(range(info.experts)))
    return e


def _generate(monkeypatch, pipe, params, n=16, warm=False, stop_at=None):
    monkeypatch.setenv(pipelined.ENV, "1" if pipe else "0")
    e = _engine(warm)
    prompt = e.tokenizer.encode("Once upon a time, there was")
    sampler = Sampler(params)
    assert (pipelined.why_not(e, sampler) == "") == pipe
    out = []
    for t in tokens(e, prompt, sampler):
        if t == stop_at:
            break
        out.append(t)
        if len(out) == n:
            break
    after = e.forward([5], last_only=True)[-1]  # the next step sees the cache the loop left
    s = e.pager.stats
    r = dict(out=out, cached=list(e.tokens), after=after, hits=s.hits, misses=s.misses,
             voided=pipelined.Pipeline.of(e).voided if pipe else None)
    e.close()
    return r


@pytest.mark.parametrize("params", [GREEDY, DEFAULTS, FULL], ids=["greedy", "defaults", "full"])
@pytest.mark.parametrize("warm", [False, True], ids=["misses", "resident"])
def test_pipelined_tokens_are_the_loops(monkeypatch, params, warm):
    ref, got = _generate(monkeypatch, False, params, warm=warm), _generate(monkeypatch, True, params, warm=warm)
    assert got["out"] == ref["out"] and got["cached"] == ref["cached"]
    assert torch.equal(got["after"], ref["after"])
    assert (got["hits"], got["misses"]) == (ref["hits"], ref["misses"])
    # cold: steps that route to an expert the prompt never loaded void the step and the next
    assert (got["voided"] == 0) == warm


def test_a_stop_mid_run_leaves_the_loops_cache(monkeypatch):
    ref = _generate(monkeypatch, False, DEFAULTS, n=20)
    stop = ref["out"][9]  # the 10th token ends the run, as an EOS would
    a = _generate(monkeypatch, False, DEFAULTS, n=20, stop_at=stop)
    b = _generate(monkeypatch, True, DEFAULTS, n=20, stop_at=stop)
    assert b["out"] == a["out"] == ref["out"][:ref["out"].index(stop)]
    assert b["cached"] == a["cached"] and torch.equal(b["after"], a["after"])


def test_complete_with_stop_ids(monkeypatch):
    """generate.complete (the `flashmoe run` / shell path): pieces and the cache as unpipelined."""
    res = {}
    for pipe in (False, True):
        monkeypatch.setenv(pipelined.ENV, "1" if pipe else "0")
        e = _engine()
        prompt = e.tokenizer.encode("The cat")
        first = list(complete(e, prompt, DEFAULTS, max_tokens=12))
        ids = [t for p in first for t in p.token_ids]
        e.reset()
        pieces = list(complete(e, prompt, DEFAULTS, max_tokens=12, stop_ids={ids[6]}))
        res[pipe] = ([(p.text, p.token_ids, p.finish_reason) for p in first + pieces], list(e.tokens),
                     e.forward([7], last_only=True)[-1])
        e.close()
    assert res[True][:2] == res[False][:2] and res[True][0][-1][2] == "stop"
    assert torch.equal(res[True][2], res[False][2])


def test_the_context_end_as_the_loop(monkeypatch):
    for pipe in (False, True):
        monkeypatch.setenv(pipelined.ENV, "1" if pipe else "0")
        e = _engine(warm=True, n_ctx=16)
        prompt = e.tokenizer.encode("Once upon a time")
        got = []
        with pytest.raises(ContextError):
            for t in tokens(e, prompt, Sampler(GREEDY)):
                got.append(t)
        assert len(got) == 16 - len(prompt) + 1 and len(e.tokens) == 16
        e.close()


def test_what_keeps_the_loop(monkeypatch):
    e = _engine()
    why = lambda **kw: pipelined.why_not(e, Sampler(SamplingParams(**kw)))  # noqa: E731
    assert why(temperature=0) == why() == ""
    assert why(repeat_penalty=1.1) == "penalties" and why(logit_bias={3: 1.0}) == "logit_bias"
    assert why(mirostat_mode=2) == "mirostat" and why(typical_p=0.5) == "typical_p"
    assert why(temperature=0, repeat_penalty=1.1) == "penalties"  # they move the argmax too
    assert why(temperature=0, mirostat_mode=2) == ""  # greedy comes first in the host's chain
    monkeypatch.setenv(pipelined.ENV, "0")
    assert why() == "FLASHMOE_PIPELINE=0"
    e.close()
    monkeypatch.delenv(pipelined.ENV)
    off = Engine(demo_model_path(), decode_graph="off")
    assert "decode_graph off" in pipelined.why_not(off, Sampler(GREEDY))
    off.close()


@pytest.mark.parametrize("params", [GREEDY, DEFAULTS, FULL,
                                    SamplingParams(temperature=0.7, top_k=5, top_p=0.5, min_p=0.2, seed=2)],
                         ids=["greedy", "defaults", "full", "narrow"])
def test_device_sampler_is_the_host_chain(params):
    """DeviceSampler.pick with the host's draw = Sampler's token; ties at the k-th value: void."""
    g = torch.Generator().manual_seed(0)
    host, dev = Sampler(params), Sampler(params)
    pick = pipelined.DeviceSampler(params)
    for i in range(200):
        x = torch.randn(1, 500, generator=g) * 3
        if i % 7 == 0 and 0 < params.top_k < 500:  # a tie at the k-th value
            top = torch.topk(x[0], params.top_k)
            x[0, (x[0] < top.values[-1]).nonzero()[0]] = top.values[-1]
        want = host(x[0], [])
        u = torch.rand(1, generator=dev.gen, dtype=torch.float64)
        tok, void = pick.pick(x, u).tolist()
        assert void == (i % 7 == 0 and 0 < params.top_k < 500 and params.temperature > 0)
        if not void:
            assert tok == want, i


def _llama(monkeypatch, pipe, **kw):
    from flashmoe_plugin import Llama
    monkeypatch.setenv(pipelined.ENV, "1" if pipe else "0")
    return Llama(model_path="demo", n_ctx=128, seed=7, verbose=False, decode_graph="on", prefetch="off", **kw)


def test_llama_create_completion_pipelined(monkeypatch):
    """Llama's completions (the adapter's own loop): the same dicts, and scores / input_ids filled
    as eval fills them; a streamed stop string; the server's observing processor keeps it pipelined
    and its cancellation still ends the run."""
    from flashmoe_plugin.adapters.llama_cpp import LogitsProcessorList
    res = {}
    for pipe in (False, True):
        llm = _llama(monkeypatch, pipe)
        a = llm.create_completion("Once upon a time", max_tokens=14, seed=3)
        n = llm.n_tokens
        state = (llm.input_ids[:n].copy(), llm.scores[n - 1].copy(), n)
        stop = a["choices"][0]["text"][8:11]
        b = [c["choices"][0]["text"] for c in llm.create_completion("Once upon a time", max_tokens=14, seed=3,
                                                                  stop=[stop], stream=True)]
        seen = []

        def watch(ids, scores):
            seen.append(len(ids))
            if len(seen) == 5:
                raise KeyboardInterrupt  # a cancellation (the server raises its own)
            return scores
        lp = LogitsProcessorList([watch])
        lp.observes_only = True
        with pytest.raises(KeyboardInterrupt):
            llm.create_completion("Once upon a time", max_tokens=14, seed=3, logits_processor=lp)
        used = getattr(llm._engine.fast, "_pipeline", None) is not None
        after = llm.create_completion("Once upon a time", max_tokens=4, seed=5)["choices"][0]["text"]
        res[pipe] = (a["choices"][0], state, b, seen, used, after)
        llm.close()
    (a0, s0, b0, seen0, used0, after0), (a1, s1, b1, seen1, used1, after1) = res[False], res[True]
    assert a1 == a0 and b1 == b0 and seen1 == seen0 and after1 == after0
    assert (used0, used1) == (False, True)
    assert np.array_equal(s1[0], s0[0]) and np.array_equal(s1[1], s0[1]) and s1[2] == s0[2]


def test_bench_decodes_pipelined(monkeypatch):
    """`flashmoe bench` decodes through the pipelined loop where it applies and says so."""
    from flashmoe_plugin.bench.store import run_bench
    for env, want in (("1", "on"), ("0", "FLASHMOE_PIPELINE=0")):
        monkeypatch.setenv(pipelined.ENV, env)
        r = run_bench(demo_model_path(), tokens=4, prompt_tokens=8, compute_bound=False, decode_graph="on",
                      prefetch="off")
        assert r["decode_pipelined"] == want and r["tokens"] == 4 and r["decode_tok_s"] > 0
