"""Token sampling in llama.cpp's order: logit bias, penalties, top-k, typical, top-p, min-p,
temperature, then a draw from a seeded generator (same seed and inputs -> same tokens).
Temperature <= 0 is greedy."""
from __future__ import annotations

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


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.gen = torch.Generator().manual_seed(params.seed if params.seed is not None else random.getrandbits(63))

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
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
        if p.temperature <= 0:
            return int(torch.argmax(x))
        if 0 < p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x[x < kth] = -float("inf")
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
        probs = torch.softmax(x / p.temperature, -1)
        return int(torch.multinomial(probs, 1, generator=self.gen))


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
