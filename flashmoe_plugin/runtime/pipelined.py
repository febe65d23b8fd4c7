"""Decode pipelined by one token (issue 9): the next step is queued before this one is read back,
so the GPU never waits for the host between two tokens.

Today's loop (generate.tokens over Engine.forward) replays the whole-token graph, waits for it,
copies the logits to the host, samples there and only then queues the next replay: the GPU idles
through the wait's wake-up, the read-back, the sampler, the settle's bookkeeping and the next
launch (~0.25 ms a token on the H200, 8% of a Mixtral token). Here the token is chosen on the
device by a few kernels after the graph (`DeviceSampler`: greedy, or temperature / top-k / top-p /
min-p with torch ops and no host sync; its uniform number is drawn on the host from the Sampler's
own generator, in the same order, so the tokens are the unpipelined loop's) and copied into the
pinned token buffer that the next replay's first node reads. So step s+1 is queued right behind
step s, and the host reads step s (its token, its routing rows) while s+1 runs:

    queue(0); yield x0
    loop: queue(s+1)      # its input x_{s+1} is what step s's tail picked, on the device
          settle(s)       # wait for s; its routing rows -> hits noted; x_{s+1} read back
          yield x_{s+1}   # the caller's work (detokenize, stop strings) runs under step s+1

- A stop (EOS, a stop string, max_tokens: the caller closes the generator) leaves the token it
  stopped at computed as a speculative step: its KV position is simply not kept (engine.tokens
  never lists it; the next step at that position overwrites it, Engine.truncate's semantics)
  and its logits never reach anyone.
- A miss in step s (a layer read a placeholder slot) or a sampler that must see the host (top-k
  with ties at the k-th value) voids s and s+1: everything queued runs out, step s is recomputed
  through the pager path (every layer: step s+1's replay overwrote the saved residuals), its
  token sampled on the host with the generator rewound to where step s's draw began, and s+1 is
  queued again. The tokens are the unpipelined loop's.
- Only the whole-token step (DeviceDecode, one graph or its uncaptured CPU twin) with a sampler
  the device can run: penalties, logit_bias, grammars, mirostat, typical_p and custom sampling
  functions keep today's loop (`why_not` says which). FLASHMOE_PIPELINE=0 turns it off.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch

from .sampling import Sampler

ENV = "FLASHMOE_PIPELINE"


def why_not(engine, sampler) -> str:
    """Why tokens sampled by `sampler` on `engine` cannot be pipelined ('' when they can)."""
    from .graph_decode import DeviceDecode
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    f = engine.fast
    if f is None:
        return "no device decode step (decode_graph off)"
    if type(f) is not DeviceDecode:
        return "the step is cut into segments between host layers (runtime/hybrid_decode.py)"
    if f.mode != "on":
        return f"decode_graph={f.mode}"
    if f.cuda and (f.graph is None or len(f.graphs) != 1):
        return "the step is not captured: " + (f.why_not or "several graphs")
    if not isinstance(sampler, Sampler):
        return "a custom sampling function"
    return DeviceSampler.why_not(sampler)


class DeviceSampler:
    """Sampler's chain for the parameters the device can take, as torch ops that never wait for
    the host: (token, void) as a [2] long tensor; void = 1 where the host's chain could differ
    (top-k ties at the k-th value: the host keeps every tie)."""

    def __init__(self, params):
        self.p, self.zero = params, None

    @staticmethod
    def why_not(sampler) -> str:
        p = sampler.p
        if sampler.constraint is not None:
            return "a grammar"
        if p.logit_bias:
            return "logit_bias"
        if p.penalty_last_n > 0 and (p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty):
            return "penalties"
        if p.temperature <= 0:
            return ""
        if p.mirostat_mode:
            return "mirostat"
        if 0 < p.typical_p < 1.0:
            return "typical_p"
        return ""

    def pick(self, logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """logits [1, V] float32, u [1] float64 (the draw); Sampler._pick's steps, in its order."""
        p, x = self.p, logits[0]
        if self.zero is None:  # made once: no fill kernel per token
            self.zero = torch.zeros((), dtype=torch.long, device=x.device)
        void = self.zero
        if p.temperature <= 0:
            return torch.stack([torch.argmax(x), void])
        ids = None
        if 0 < p.top_k < x.numel():
            top = torch.topk(x, p.top_k)
            void = ((x >= top.values[-1]).sum() != p.top_k).long()
            ids = top.indices.sort().values  # nonzero's order (ascending ids), as the host's chain
            x = x.index_select(0, ids)
        if p.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            sm = torch.softmax(sorted_x, -1)
            drop = sm.cumsum(-1) - sm >= p.top_p
            x = x.scatter(0, order, torch.where(drop, -float("inf"), sorted_x))
        if p.min_p > 0:
            probs = torch.softmax(x, -1)
            x = torch.where(probs < p.min_p * probs.max(), -float("inf"), x)
        c = torch.softmax(x / p.temperature, -1).double().cumsum(0)
        i = torch.searchsorted(c, u * c[-1], right=True).clamp_(max=c.numel() - 1)
        tok = i[0] if ids is None else ids.index_select(0, i)[0]
        return torch.stack([tok, void])


class Pipeline:
    """The ring of two steps' read-back buffers on one DeviceDecode (made once, `of(engine)`)."""

    def __init__(self, engine):
        self.e, f = engine, engine.fast
        self.f, cuda = f, f.cuda
        host = dict(device="cpu", pin_memory=cuda)
        self.route = [torch.zeros_like(f.route, **host) for _ in range(2)]
        self.out = [torch.zeros(2, dtype=torch.long, **host) for _ in range(2)]
        self.logits = [torch.zeros_like(f.logits, **host) for _ in range(2)]
        self.u_host = [torch.zeros(1, dtype=torch.float64, **host) for _ in range(2)]
        self.u = torch.zeros(1, dtype=torch.float64, device=f.pos.device)
        self.done = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.queued = [False, False]
        self.states: list = [None, None]
        self.voided = 0  # steps recomputed (misses, host-only picks), for tests and benchmarks
        self._warm()

    def _warm(self):
        """Every kernel a pick can launch, run once now: on CUDA a kernel's first launch loads its
        module (lazy loading), which waits for the device, and would stall the first tokens'
        pipeline instead of the engine's first generation setup."""
        from .sampling import SamplingParams
        for p in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.05),
                  SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)):
            self.out[0].copy_(DeviceSampler(p).pick(self.f.logits, self.u), non_blocking=self.f.cuda)
        self.out[0].zero_()

    @classmethod
    def of(cls, engine) -> "Pipeline":
        f = engine.fast
        if getattr(f, "_pipeline", None) is None:
            f._pipeline = cls(engine)
        return f._pipeline

    def tokens(self, logits: torch.Tensor, sampler: Sampler, on_token=None, keep_logits: bool = False) -> Iterator:
        """Endless stream of sampled tokens after the prompt whose last logits are `logits`, as
        generate.tokens yields them (keep_logits: (token, logits that chose it or None for the
        first) pairs). Engine.tokens lists a token once the caller asks for the next one."""
        e, f = self.e, self.f
        pick, n = DeviceSampler(sampler.p), e.n_past
        self.states = [None, None]  # the generator's state before each queued step's draw
        tok, s = sampler(logits, e.tokens), 0
        row = None
        f._tok_np[0] = tok  # nothing in flight: the prefill's step is done, the last generation drained
        self._queue(0, n, pick, sampler, keep_logits)
        try:
            while True:
                if on_token:
                    on_token(tok)
                yield (tok, row) if keep_logits else tok
                if not self.queued[s % 2]:  # past the context: forward() says so, as in today's loop
                    e.forward([tok], last_only=True)
                e.tokens.append(tok)  # its step is queued (or done)
                self._queue(s + 1, n + s + 1, pick, sampler, keep_logits)
                tok, row = self._settle(s, n + s, pick, sampler, keep_logits)
                s += 1
        finally:
            self._drain()

    # ------------------------------------------------------------------ the two halves of a step
    def _queue(self, s: int, pos: int, pick, sampler, keep_logits) -> None:
        """Step s at position `pos` (its token: what the last step's tail picked, or what the host
        wrote), then its tail: the next token picked into the pinned buffer the next replay reads,
        and the read-back into ring slot s % 2."""
        e, f, b = self.e, self.f, s % 2
        self.queued[b] = pos < e.n_ctx
        if not self.queued[b]:
            return
        if sampler.p.temperature > 0:  # one uniform number per token, in the unpipelined loop's order
            self.states[b] = sampler.gen.get_state()
            self.u_host[b].copy_(torch.rand(1, generator=sampler.gen, dtype=torch.float64))
        with torch.inference_mode():
            f.steps += 1
            if f.pos_value != pos:
                f.pos.fill_(pos)
            f.pos_value = pos + 1
            f.table.ready()
            if f.graph is not None:
                f.graph.replay()
                f.replays += 1
            else:  # the CPU twin: the same step, uncaptured
                f._body(0, fast=True)
            if sampler.p.temperature > 0:
                self.u.copy_(self.u_host[b], non_blocking=f.cuda)
            out = pick.pick(f.logits, self.u)
            f.tok_host.copy_(out[:1], non_blocking=f.cuda)  # the next replay's copy node reads it
            self.out[b].copy_(out, non_blocking=f.cuda)
            self.route[b].copy_(f.route, non_blocking=f.cuda)
            if keep_logits:
                self.logits[b].copy_(f.logits, non_blocking=f.cuda)
            if f.cuda:
                self.done[b].record()

    def _settle(self, s: int, pos: int, pick, sampler, keep_logits):
        """Wait for step s (s+1 is queued behind it): its hits noted and the token its tail picked;
        or, where it missed or its pick needs the host, s redone and s+1 queued again."""
        e, f, b, k, at = self.e, self.f, s % 2, self.f.cfg.top_k, self.f.at
        e.pager.touch_noted()  # the previous token's policy touches while the GPU is busy
        if f.cuda:
            self.done[b].synchronize()
        flat, (tok, void) = self.route[b].tolist(), self.out[b].tolist()
        if e.trace is not None:
            e.trace.begin(pos, 1)
        if e.predictor is not None:
            e.predictor.end_sequence()
        order = f.order
        missed = any(flat[at + row] for row in range(len(order)))
        if not missed and not void:
            f._note([(layer, flat[row * k:(row + 1) * k]) for row, layer in enumerate(order)])
            return tok, (self.logits[b][0].clone() if keep_logits else None)
        # void: everything queued runs out, then step s again through the pager path
        self.voided += 1
        f.fallbacks += missed
        self._drain()
        with torch.inference_mode():
            f._tok_np[0] = e.tokens[-1]  # step s's token (the tail of s+1 overwrote the buffer)
            with f._on_stream():
                f.pos.fill_(pos)
                f._body(0, fast=False)
                f._read_back()
            f.pos_value = pos + 1
            logits = f.logits_host[0].clone()
        if self.states[b] is not None:
            sampler.gen.set_state(self.states[b])  # the draw step s's tail used, drawn again
        tok = sampler(logits, e.tokens)
        f._tok_np[0] = tok
        self._queue(s + 1, pos + 1, pick, sampler, keep_logits)
        return tok, (logits if keep_logits else None)

    def _drain(self):
        """Wait for every queued step (their read-backs land in pinned memory)."""
        if self.f.cuda:
            for ev, q in zip(self.done, self.queued):
                if q:
                    ev.synchronize()
