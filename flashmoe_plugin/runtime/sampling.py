"""Token sampling in llama.cpp's order: logit bias, penalties, the grammar's mask (a
runtime.constraints.Constraint), then top-k, typical, top-p, min-p, temperature and a draw from
a seeded generator (same seed and inputs -> same tokens), or mirostat 1/2 in their place.
After top-k the chain runs on the candidates alone, and the draw is one uniform number against
their cumulative probabilities: ~0.2 ms per token with llama-cpp-python's defaults over a 32k
vocabulary, where a vocabulary-wide chain and torch.multinomial took ~3.7 ms on 2 cores.
Temperature <= 0 is greedy."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    logit_bias: dict | None = None
    seed: int | None = None
    mirostat_mode: int = 0          # 1 or 2: llama.cpp's mirostat samplers instead of top-k..temperature
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1


def greedy(x: torch.Tensor) -> int:
    """The first index of the maximum of a CPU float row (torch.argmax's answer, NaN counting as
    the maximum as there), through numpy: ~4 us for a 32k vocabulary where torch's CPU reduction
    took ~35, on every greedy decode token's critical path."""
    return int(x.numpy().argmax())


class Sampler:
    def __init__(self, params: SamplingParams, constraint=None):
        if params.mirostat_mode not in (0, 1, 2):
            raise ValueError(f"mirostat_mode must be 0, 1 or 2, not {params.mirostat_mode}")
        self.p = params
        self.constraint = constraint
        self.mu = 2.0 * params.mirostat_tau  # mirostat's running surprise bound
        self.gen = torch.Generator().manual_seed(params.seed if params.seed is not None else random.getrandbits(63))

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        tok = self._pick(logits, history)
        if self.constraint is not None:
            self.constraint.accept(tok)
        return tok

    def _pick(self, logits: torch.Tensor, history: list[int]) -> int:
        p = self.p
        x = logits.detach().float().cpu().clone()
        if p.logit_bias:
            for t, b in p.logit_bias.items():
                x[int(t)] += float(b)
        recent = history[-p.penalty_last_n:] if p.penalty_last_n > 0 else []
        if recent and (p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty):
            ids, counts = torch.unique(torch.tensor(recent), return_counts=True)
            v = x[ids]
            if p.repeat_penalty != 1.0:
                v = torch.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
            v = v - counts.float() * p.frequency_penalty - p.presence_penalty
            x[ids] = v
        if self.constraint is not None:
            self.constraint.mask(x)
        if p.temperature <= 0:
            return greedy(x)
        if p.mirostat_mode:
            return self._mirostat(x)
        ids = None  # the candidates' token ids (None: the whole vocabulary)
        if 0 < p.top_k < x.numel():
            # the rest of the chain runs on the top-k candidates alone (ties with the k-th kept),
            # not on a vocabulary-wide row of -inf: ~40 values to sort and draw from, not 32k
            kth = torch.topk(x, p.top_k).values[-1]
            ids = torch.nonzero(x >= kth).flatten()
            x = x[ids]
        if 0 < p.typical_p < 1.0:
            x = _typical(x, p.typical_p)
        if p.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            cum = torch.softmax(sorted_x, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_x, -1) >= p.top_p  # keep the smallest set reaching top_p
            x[order[drop]] = -float("inf")
        if p.min_p > 0:
            probs = torch.softmax(x, -1)
            x[probs < p.min_p * probs.max()] = -float("inf")
        return self._draw(ids, torch.softmax(x / p.temperature, -1))

    def _draw(self, ids, probs: torch.Tensor) -> int:
        """A token drawn from `probs` over the candidates `ids` (None: the whole vocabulary): one
        uniform number against the cumulative sum (torch.multinomial draws one exponential per
        entry: ~0.7 ms over a 32k vocabulary). An entry of probability 0 is never drawn."""
        c = probs.double().cumsum(0)
        u = torch.rand(1, generator=self.gen, dtype=torch.float64) * c[-1]
        i = min(int(torch.searchsorted(c, u, right=True)), len(c) - 1)
        return i if ids is None else int(ids[i])

    def _mirostat(self, x: torch.Tensor) -> int:
        """llama.cpp's llama_sampler_mirostat (v1, m = 100) and mirostat_v2 on raw logits (no
        temperature, as llama-cpp-python chains them); mu is kept across the generation's tokens."""
        probs, order = torch.sort(torch.softmax(x, -1), descending=True)
        keep = self.mirostat_keep(probs, int(torch.isfinite(x).sum()))
        kept = probs[:keep] / probs[:keep].sum()
        i = int(torch.multinomial(kept, 1, generator=self.gen))
        self.mu -= self.p.mirostat_eta * (-math.log2(float(kept[i])) - self.p.mirostat_tau)
        return int(order[i])

    def mirostat_keep(self, probs: torch.Tensor, n_finite: int) -> int:
        """How many of the most likely candidates (probs sorted descending) mirostat keeps."""
        if self.p.mirostat_mode == 2:  # drop every candidate more surprising than mu
            return max(int((-torch.log2(probs) <= self.mu).long().cumprod(0).sum()), 1)
        k = min(100 - 1, n_finite - 1)  # v1: estimate the Zipf exponent from the top m = 100
        if k > 0:
            t = torch.log(torch.arange(2, k + 2, dtype=torch.float64) / torch.arange(1, k + 1, dtype=torch.float64))
            b = torch.log(probs[:k].double() / probs[1:k + 1].double())
            s_hat = float((t * b).sum() / (t * t).sum())
        else:
            s_hat = 1.0
        eps = s_hat - 1
        try:
            top = ((eps * 2 ** self.mu) / (1 - probs.numel() ** -eps)) ** (1 / s_hat)
        except (ZeroDivisionError, OverflowError):
            top = float(probs.numel())
        return min(max(int(top) if math.isfinite(top) else probs.numel(), 1), probs.numel())


def _typical(x: torch.Tensor, mass: float) -> torch.Tensor:
    logp = torch.log_softmax(x, -1)
    prob = logp.exp()
    ent = -(torch.nan_to_num(prob * logp)).sum()
    dev = (-logp - ent).abs()
    order = torch.argsort(dev)
    cum = prob[order].cumsum(-1)
    keep = cum - prob[order] < mass
    out = torch.full_like(x, -float("inf"))
    out[order[keep]] = x[order[keep]]
    return out
