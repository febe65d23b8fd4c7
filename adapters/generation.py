"""Sampling and the token loop of `adapters.llama_cpp.Llama` (a mixin): llama-cpp-python's
`sample` and `generate`, and the generator every completion runs on. Sampling itself is the
core's (runtime.sampling.Sampler, with a runtime.constraints.Constraint for grammars)."""
from __future__ import annotations

import time
from typing import Dict, Iterator, Optional, Sequence

import numpy as np
import torch

LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's "pick a random seed"


class Generation:
    def _params(self, top_k, top_p, min_p, typical_p, temp, repeat_penalty, frequency_penalty,
                presence_penalty, logit_bias=None, seed=None, mirostat_mode=0, mirostat_tau=5.0, mirostat_eta=0.1):
        from flashmoe_plugin.runtime.sampling import SamplingParams
        if temp < 0:  # llama.cpp: negative temperature = sample the full distribution
            temp, top_k, top_p, min_p, typical_p = 1.0, 0, 1.0, 0.0, 1.0
        seed = self._seed if seed is None else seed
        return SamplingParams(temperature=float(temp), top_k=int(top_k), top_p=float(top_p), min_p=float(min_p),
                              typical_p=float(typical_p), repeat_penalty=float(repeat_penalty),
                              frequency_penalty=float(frequency_penalty), presence_penalty=float(presence_penalty),
                              penalty_last_n=self.last_n_tokens_size,
                              logit_bias={int(k): float(v) for k, v in logit_bias.items()} if logit_bias else None,
                              seed=None if seed == LLAMA_DEFAULT_SEED else int(seed),
                              mirostat_mode=int(mirostat_mode or 0), mirostat_tau=float(mirostat_tau),
                              mirostat_eta=float(mirostat_eta))

    def _constraint(self, grammar):
        """A grammar (GBNF string, llama_cpp.LlamaGrammar, flashmoe Grammar) as a live constraint
        on this model's vocabulary; the model's end-of-generation tokens count as its EOS."""
        from flashmoe_plugin.runtime.constraints import Constraint, as_grammar
        g = as_grammar(grammar)
        return None if g is None else Constraint(g, self._tok, self._n_vocab, end_ids=self._eog)

    def _make_sampler(self, params, logits_processor=None, constraint=None):
        from flashmoe_plugin.runtime.sampling import Sampler
        return self._wrap(Sampler(params, constraint), logits_processor)

    @staticmethod
    def _wrap(sampler, logits_processor):
        if logits_processor is None:
            return sampler

        def sample(logits: torch.Tensor, history: list[int]) -> int:
            row = logits.float().numpy().copy()
            row = logits_processor(np.asarray(history, dtype=np.intc), row)
            return sampler(torch.from_numpy(np.asarray(row, dtype=np.float32)), history)
        return sample

    def sample(self, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
               temp: float = 0.80, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
               presence_penalty: float = 0.0, tfs_z: float = 1.0, mirostat_mode: int = 0,
               mirostat_eta: float = 0.1, mirostat_tau: float = 5.0, penalize_nl: bool = True,
               logits_processor=None, grammar=None, idx: Optional[int] = None) -> int:
        """Sample the next token from the logits of the last evaluated position (or `idx`)."""
        n = self.n_tokens
        assert n > 0, "sample() needs evaluated tokens (call eval first)"
        pos = n - 1 if idx is None else int(idx)
        if not self._row_ok[pos]:
            raise ValueError(f"no logits kept for position {pos} (create the Llama with logits_all=True)")
        sampler = self._make_sampler(
            self._params(top_k, top_p, min_p, typical_p, temp, repeat_penalty, frequency_penalty, presence_penalty,
                         mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta),
            logits_processor, self._constraint(grammar))
        return int(sampler(torch.from_numpy(self.scores[pos]), self._engine.tokens[: pos + 1]))

    def generate(self, tokens: Sequence[int], top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 typical_p: float = 1.0, temp: float = 0.80, repeat_penalty: float = 1.0, reset: bool = True,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, tfs_z: float = 1.0,
                 mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                 penalize_nl: bool = True, logits_processor=None, stopping_criteria=None, grammar=None,
                 logit_bias: Optional[Dict[int, float]] = None):
        """Endless stream of sampled tokens after `tokens` (the caller stops it). With reset=True
        the longest cached prefix is kept and only the rest is evaluated. `send(list)` appends
        extra tokens to evaluate after the yielded one, as in llama-cpp-python."""
        params = self._params(top_k, top_p, min_p, typical_p, temp, repeat_penalty, frequency_penalty,
                              presence_penalty, logit_bias, mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau,
                              mirostat_eta=mirostat_eta)
        return self._generate(list(tokens), params, logits_processor, stopping_criteria, reset=reset,
                              constraint=self._constraint(grammar))

    def _generate(self, tokens: list[int], params, logits_processor=None, stopping_criteria=None,
                  reset: bool = True, rows: bool = False, constraint=None, fast_forward: bool = False) -> Iterator[int]:
        """fast_forward: tokens the grammar forces after a sampled one are yielded without
        sampling and evaluated together with it in one batch (a JSON key, a tool call's fixed
        text: one forward pass instead of one per token)."""
        tokens = [int(t) for t in tokens]
        if not tokens and (reset or self.n_tokens == 0):
            raise ValueError("generate() needs at least one prompt token")
        from flashmoe_plugin.runtime import pipelined
        from flashmoe_plugin.runtime.sampling import Sampler
        base = Sampler(params, constraint)
        sampler = self._wrap(base, logits_processor)
        eng = self._engine
        # decode pipelined by one token (runtime/pipelined.py) where nothing needs the logits on the
        # host before the next step: no stopping criteria, no logits processor but observers (the
        # server's cancellation check), no echo rows; the sampler's own limits are why_not's
        observes = getattr(logits_processor, "observes_only", False)
        pipe = stopping_criteria is None and not rows and (logits_processor is None or observes)
        if reset and self.n_tokens > 0:
            cached = eng.tokens
            keep = self.longest_token_prefix(cached, tokens)
            if rows:  # rows of the kept prefix must exist too (echo with logprobs)
                missing = np.flatnonzero(~self._row_ok[:keep])
                keep = int(missing[0]) if len(missing) else keep
            if keep == len(tokens) == len(cached) and self._row_ok[keep - 1]:
                tokens = []  # exactly the cached context, logits at hand: sample right away
            else:
                keep = min(keep, len(tokens) - 1)  # re-evaluate at least one token for fresh logits
                eng.truncate(keep)
                tokens = tokens[keep:]
            reset = False
        if reset:
            self.reset()
        hooks = self._hooks
        while True:
            before = eng.pager.stats.snapshot()
            t0 = time.perf_counter()
            if tokens:
                self._rows_wanted = rows
                try:
                    self.eval(tokens)
                finally:
                    self._rows_wanted = False
            pos = self.n_tokens - 1
            if pipe and not pipelined.why_not(eng, base):
                token, extra = yield from self._pipelined(base, logits_processor if observes else None, pos, before, t0)
                tokens, pipe = [token] + extra, False  # tokens sent in: today's loop from here
                continue
            token = int(sampler(torch.from_numpy(self.scores[pos]), eng.tokens))
            stats = eng.pager.stats.delta(before)
            stats.update(token=token, n_past=self.n_tokens, seconds=time.perf_counter() - t0)
            hooks.on_token(stats=stats)
            if stopping_criteria is not None:
                ids = np.append(self.input_ids[: self.n_tokens], np.intc(token))
                if stopping_criteria(ids, self.scores[pos]):
                    return
            extra = yield token
            tokens = [token] + [int(t) for t in (extra or [])]
            if fast_forward and not extra:
                for forced in constraint.forced():
                    constraint.accept(forced)
                    tokens.append(forced)
                    yield forced

    def _pipelined(self, sampler, observer, pos: int, before, t0):
        """The tokens after position `pos` pipelined by one token, each yielded while its own
        step runs; scores and input_ids filled as eval would (each row once the next token is
        read). Returns (token, extra) when the caller sends tokens in (today's loop evaluates
        them: the token's speculative step is not kept)."""
        from flashmoe_plugin.runtime.pipelined import Pipeline
        eng, hooks = self._engine, self._hooks
        gen = Pipeline.of(eng).tokens(torch.from_numpy(self.scores[pos]), sampler, keep_logits=True)
        try:
            for token, row in gen:
                n = self.n_tokens
                if row is not None:  # the logits of the token before this one (engine.tokens' last)
                    self.input_ids[n - 1] = eng.tokens[-1]
                    self.scores[n - 1, :] = row.float().numpy()
                    self._row_ok[n - 1] = True
                if observer is not None:  # e.g. the server's cancellation check: it sees, never changes, the row
                    observer(self.input_ids[:n], self.scores[n - 1])
                stats = eng.pager.stats.delta(before)
                stats.update(token=token, n_past=n, seconds=time.perf_counter() - t0)
                hooks.on_token(stats=stats)
                before, t0 = eng.pager.stats.snapshot(), time.perf_counter()
                extra = yield token
                if extra:
                    return token, [int(t) for t in extra]
        finally:
            gen.close()
