"""The sampler against llama.cpp's own samplers (through llama-cpp-python's C API, no model) on the
same logits and history: penalties, top_k, typical_p, top_p, min_p and temperature (negative
included), in llama.cpp's order. Their semantics are the contract of a drop-in for
llama_cpp.Llama. Compared: the distribution the draw is made from (the support and every
probability), captured at the draw."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from flashmoe_plugin.runtime.sampling import Sampler, SamplingParams

llama_cpp = pytest.importorskip("llama_cpp")

V = 64


def llama_distribution(logits: np.ndarray, history: list[int], p: SamplingParams) -> np.ndarray:
    """Probabilities over the vocabulary after llama.cpp's sampler chain (before the draw)."""
    n = len(logits)
    data = (llama_cpp.llama_token_data * n)(*[llama_cpp.llama_token_data(i, float(x), 0.0) for i, x in enumerate(logits)])
    arr = llama_cpp.llama_token_data_array(data, n, -1, False)
    chain = []
    if p.penalty_last_n and (p.repeat_penalty != 1 or p.frequency_penalty or p.presence_penalty):
        s = llama_cpp.llama_sampler_init_penalties(p.penalty_last_n, p.penalty_last_n, p.repeat_penalty,
                                                   p.frequency_penalty, p.presence_penalty)
        for t in history:
            llama_cpp.llama_sampler_accept(s, t)
        chain.append(s)
    if p.temperature > 0:
        if p.top_k > 0:
            chain.append(llama_cpp.llama_sampler_init_top_k(p.top_k))
        chain.append(llama_cpp.llama_sampler_init_typical(p.typical_p, 1))
        chain.append(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
        chain.append(llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
    chain.append(llama_cpp.llama_sampler_init_temp(p.temperature))
    for s in chain:
        llama_cpp.llama_sampler_apply(s, ctypes.byref(arr))
        llama_cpp.llama_sampler_free(s)
    kept = {arr.data[i].id: arr.data[i].logit for i in range(arr.size) if np.isfinite(arr.data[i].logit)}
    out = np.zeros(n)
    ids = np.array(sorted(kept))
    z = np.array([kept[i] for i in ids], dtype=np.float64)
    if p.temperature <= 0:  # llama.cpp's temp <= 0 keeps the maximum only
        out[ids[np.argmax(z)]] = 1.0
        return out
    e = np.exp(z - z.max())
    out[ids] = e / e.sum()
    return out


def our_distribution(logits: np.ndarray, history: list[int], p: SamplingParams, monkeypatch) -> np.ndarray:
    seen = []
    real = Sampler._draw

    def spy(self, ids, probs):  # the distribution the draw is made from, over the whole vocabulary
        out = torch.zeros(len(logits), dtype=torch.float64)
        out[slice(None) if ids is None else ids] = probs.double()
        seen.append(out)
        return real(self, ids, probs)
    monkeypatch.setattr(Sampler, "_draw", spy)
    tok = Sampler(p)(torch.tensor(logits, dtype=torch.float32), list(history))
    monkeypatch.setattr(Sampler, "_draw", real)
    if not seen:  # no draw: a greedy choice
        out = np.zeros(len(logits))
        out[tok] = 1.0
        return out
    assert seen[-1][tok] > 0  # the token drawn is one of the distribution's candidates
    return seen[-1].numpy()


NEUTRAL = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, repeat_penalty=1.0,
               frequency_penalty=0.0, presence_penalty=0.0, penalty_last_n=64)
CASES = {
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.6),
    "min_p": dict(min_p=0.2),
    "typical_p": dict(typical_p=0.5),
    "repeat_penalty": dict(repeat_penalty=1.8),
    "frequency_penalty": dict(frequency_penalty=0.9),
    "presence_penalty": dict(presence_penalty=1.5),
    "temperature_low": dict(temperature=0.4),
    "temperature_high": dict(temperature=2.5),
    "temperature_zero": dict(temperature=0.0),
    "temperature_negative": dict(temperature=-1.0),
    "negative_with_penalties": dict(temperature=-0.5, repeat_penalty=1.5, presence_penalty=3.0),
    "all_together": dict(top_k=12, top_p=0.9, min_p=0.05, typical_p=0.9, temperature=0.8, repeat_penalty=1.3,
                         frequency_penalty=0.4, presence_penalty=0.6, penalty_last_n=6),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", range(3))
def test_distribution_matches_llama_cpp(case, seed, monkeypatch):
    g = np.random.default_rng(100 + seed)
    logits = (g.standard_normal(V) * 2.5).astype(np.float32)
    order = np.argsort(-logits)
    # history: the top tokens (positive logits, some repeated) and a negative-logit one
    history = [int(order[0])] * 3 + [int(order[1]), int(order[2]), int(order[-1]), int(order[0])]
    p = SamplingParams(**{**NEUTRAL, **CASES[case]}, seed=seed)
    ours = our_distribution(logits, history, p, monkeypatch)
    ref = llama_distribution(logits, history, p)
    assert set(np.flatnonzero(ours > 0)) == set(np.flatnonzero(ref > 0)), case
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("top_k", [0, 7])
def test_draws_follow_the_distribution(top_k):
    """The draw itself: token frequencies over many seeded draws against the distribution it was
    given (20000 draws: a frequency's standard deviation is <= 0.0036, so 0.02 is > 5 sigma)."""
    g = np.random.default_rng(7)
    logits = torch.tensor((g.standard_normal(V) * 1.5).astype(np.float32))
    p = SamplingParams(**{**NEUTRAL, "top_k": top_k}, seed=11)
    s = Sampler(p)
    want = torch.softmax(logits.double(), -1)
    if top_k:
        want[logits < torch.topk(logits, top_k).values[-1]] = 0
        want /= want.sum()
    n = 20000
    got = torch.bincount(torch.tensor([s(logits, []) for _ in range(n)]), minlength=V).double() / n
    assert set(torch.nonzero(got).flatten().tolist()) <= set(torch.nonzero(want).flatten().tolist())
    assert (got - want).abs().max() < 0.02
