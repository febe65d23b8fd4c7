"""Text completions of `adapters.llama_cpp.Llama` (a mixin): the prompt as llama-cpp-python
tokenizes it, the checks made before anything runs, and the stream of `text_completion` chunks
(stop strings held back, whole UTF-8 characters, logprobs, echo, FIM, the prompt cache)."""
from __future__ import annotations

import random
import sys
import time
import uuid
from typing import Dict, Iterator, List, Optional, Union

import numpy as np

from flashmoe_plugin.runtime.generate import stop_holdback, utf8_complete

from .generation import LLAMA_DEFAULT_SEED

# Fill-in-the-middle special tokens: (prefix, suffix, middle), tried in order.
_FIM = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
        ("<PRE>", "<SUF>", "<MID>"))


def _logprobs_of(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float32, copy=False)
    m = np.max(x)
    if not np.isfinite(m):
        m = 0.0
    z = x - m
    with np.errstate(divide="ignore"):
        return z - np.log(np.sum(np.exp(z)))


class Completions:
    def _prompt_tokens(self, prompt: Union[str, List[int]], suffix: Optional[str]):
        """(tokens, prompt text, suffix text to append): llama-cpp-python tokenizes a str prompt
        with special=True and BOS as the model wants; a token list is taken as is."""
        tok = self._tok
        if isinstance(prompt, str):
            if suffix is not None:
                fim = self._fim_ids()
                if fim:
                    pre, suf, mid = fim
                    ids = ([tok.bos_id] if tok.add_bos else []) + [pre] + tok.encode(prompt, add_bos=False) \
                        + [suf] + tok.encode(suffix, add_bos=False) + [mid]
                    return ids, prompt, None
            ids = tok.encode(prompt, add_bos=True, special=True) if prompt else (
                [tok.bos_id] if tok.bos_id is not None else [])
            return ids, prompt, suffix
        ids = [int(t) for t in prompt]
        return ids, self.detokenize(ids).decode("utf-8", errors="ignore"), suffix

    def _fim_ids(self):
        for names in _FIM:
            ids = [self._tok.encode(n, add_bos=False, special=True) for n in names]
            if all(len(i) == 1 for i in ids) and all(self._tok.decode(i) == b"" for i in ids):
                return [i[0] for i in ids]
        return None

    def _top_logprobs(self, pos: int, token: int, k: int):
        """(logprob of token, {text: logprob} of the k likeliest tokens plus token) at position pos."""
        lp = _logprobs_of(self.scores[pos])
        text = lambda i: self.detokenize([int(i)]).decode("utf-8", errors="ignore")  # noqa: E731
        top: Dict[str, float] = {}
        if k > 0:
            k = min(k, lp.shape[0])
            best = np.argpartition(-lp, k - 1)[:k]
            for i in best[np.argsort(-lp[best], kind="stable")]:
                top[text(i)] = float(lp[i])
        top[text(token)] = float(lp[token])
        return float(lp[token]), top

    def _create_completion(self, prompt, suffix=None, max_tokens=16, temperature=0.8, top_p=0.95, min_p=0.05,
                           typical_p=1.0, logprobs=None, echo=False, stop=None, frequency_penalty=0.0,
                           presence_penalty=0.0, repeat_penalty=1.0, top_k=40, stream=False, seed=None,
                           tfs_z=1.0, mirostat_mode=0, mirostat_tau=5.0, mirostat_eta=0.1, model=None,
                           stopping_criteria=None, logits_processor=None, grammar=None, logit_bias=None):
        """Checks everything up front (so a bad request raises at the call, streaming or not),
        then returns the iterator of chunk dicts (a single one when not streaming)."""
        self._check_open()
        constraint = self._constraint(grammar)
        prompt_tokens, prompt_text, suffix_text = self._prompt_tokens(prompt, suffix)
        if not prompt_tokens:
            raise ValueError("empty prompt and the model has no BOS token to start from")
        if len(prompt_tokens) >= self._n_ctx:
            raise ValueError(f"Requested tokens ({len(prompt_tokens)}) exceed context window of {self._n_ctx}")
        bad = [t for t in prompt_tokens if not 0 <= t < self._n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary (0..{self._n_vocab - 1})")
        room = self._n_ctx - len(prompt_tokens)
        max_tokens = room if max_tokens is None or max_tokens <= 0 else min(int(max_tokens), room)
        stop = stop if isinstance(stop, list) else [stop] if isinstance(stop, str) else []
        stops = [s.encode("utf-8") for s in stop if s]
        if logprobs is not None and int(logprobs) < 0:
            raise ValueError("logprobs must be a non-negative number of top tokens")
        if seed is not None:
            self.set_seed(seed)
        else:  # llama-cpp-python's seed chain: the next seed derives from the current one
            base = self._seed if self._seed != LLAMA_DEFAULT_SEED else random.getrandbits(32)
            self.set_seed(random.Random(base).randint(0, 2**32))
        params = self._params(top_k, top_p, min_p, typical_p, temperature, repeat_penalty, frequency_penalty,
                              presence_penalty, logit_bias, mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau,
                              mirostat_eta=mirostat_eta)
        if self.cache is not None:
            self._maybe_load_cached(prompt_tokens)
        request = dict(prompt_tokens=prompt_tokens, prompt_text=prompt_text, suffix_text=suffix_text,
                       max_tokens=max_tokens, stops=stops, logprobs=logprobs, echo=echo, stream=stream,
                       params=params, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                       constraint=constraint,
                       model=model if model is not None else self.model_path)
        return self._completion_chunks(**request)

    def _maybe_load_cached(self, prompt_tokens):
        try:
            item = self.cache[prompt_tokens]
        except KeyError:
            return
        prefix = self.longest_token_prefix
        if prefix(item.input_ids[: item.n_tokens].tolist(), prompt_tokens) > prefix(self._engine.tokens, prompt_tokens):
            self.load_state(item)

    def _completion_chunks(self, prompt_tokens, prompt_text, suffix_text, max_tokens, stops, logprobs, echo,
                           stream, params, logits_processor, stopping_criteria, model,
                           constraint=None) -> Iterator[dict]:
        cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())
        n_prompt = len(prompt_tokens)
        bos = self.token_bos()
        want_rows = logprobs is not None and echo

        def chunk(text, lp=None, finish=None):
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}]}

        def lp_dict(positions_tokens, base_offset, prefix_bytes):
            """llama-cpp's CompletionLogprobs for (position, token) pairs; text offsets in characters."""
            out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
            before = prefix_bytes
            for pos, t in positions_tokens:
                out["tokens"].append(self.detokenize([t]).decode("utf-8", errors="ignore"))
                out["text_offset"].append(base_offset + len(before.decode("utf-8", errors="ignore")))
                if pos <= 0:  # the first token of an echoed prompt has nothing before it
                    out["token_logprobs"].append(None)
                    out["top_logprobs"].append(None)
                else:
                    value, top = self._top_logprobs(pos - 1, t, int(logprobs))
                    out["token_logprobs"].append(value)
                    out["top_logprobs"].append(top)
                before += self._tok.token_bytes(t)
            return out

        t_start = time.perf_counter()
        before = self._engine.pager.stats.snapshot()
        completion: list[int] = []
        ends: list[int] = []            # byte end of each completion token in buf
        buf, emitted, reported = b"", 0, 0
        finish, t_first, finished = "length", None, False
        fast = constraint is not None and logprobs is None and logits_processor is None and stopping_criteria is None
        gen = self._generate(prompt_tokens, params, logits_processor, stopping_criteria, rows=want_rows,
                             constraint=constraint, fast_forward=fast)
        try:
            if stream and echo and prompt_text:
                yield chunk(prompt_text)
            for tok in gen:
                if t_first is None:
                    t_first = time.perf_counter() - t_start
                if tok in self._eog:
                    finish = "stop"
                    break
                completion.append(tok)
                start = max(0, len(buf) - max((len(s) for s in stops), default=1) + 1)
                buf += self._tok.token_bytes(tok)
                ends.append(len(buf))
                hits = [i for i in (buf.find(s, start) for s in stops) if i >= 0]
                if hits:
                    buf, finish = buf[: min(hits)], "stop"
                    break
                if stream:
                    safe = utf8_complete(buf, len(buf) - stop_holdback(buf, stops))
                    text = buf[emitted:safe].decode("utf-8", errors="ignore")
                    if not text:  # special tokens or stray bytes: nothing to show yet
                        emitted = max(emitted, safe)
                    elif safe > emitted:
                        lp = None
                        if logprobs is not None:
                            done = [i for i in range(reported, len(completion)) if ends[i] <= safe]
                            lp = lp_dict([(n_prompt + i, completion[i]) for i in done], len(prompt_text),
                                         buf[: ends[reported - 1]] if reported else b"")
                            reported += len(done)
                        yield chunk(text, lp)
                        emitted = safe
                if len(completion) >= max_tokens:
                    break
            else:
                finish = "stop"  # a stopping criterion ended the stream
            finished = True
        finally:  # also when a stream is abandoned (finish_reason None in the stats then)
            gen.close()
            self._generation_end(n_prompt, len(completion), finish if finished else None,
                                 time.perf_counter() - t_start, t_first, before)
        if self.cache is not None:
            self.cache[prompt_tokens + completion] = self.save_state()

        if stream:
            text = buf[emitted:].decode("utf-8", errors="ignore")
            if text or (logprobs is not None and reported < len(completion)):
                lp = None
                if logprobs is not None:
                    lp = lp_dict([(n_prompt + i, completion[i]) for i in range(reported, len(completion))],
                                 len(prompt_text), buf[: ends[reported - 1]] if reported else b"")
                yield chunk(text, lp)
            if suffix_text:
                yield chunk(suffix_text)
            yield chunk("", None, finish)
            return

        text = buf.decode("utf-8", errors="ignore")
        if echo:
            text = prompt_text + text
        if suffix_text:
            text += suffix_text  # no FIM tokens in this vocabulary: llama-cpp-python's fallback
        lp = None
        if logprobs is not None:
            if echo:
                first = 1 if prompt_tokens[0] == bos else 0
                pairs = [(p, prompt_tokens[p]) for p in range(first, n_prompt)]
                pairs = [(p if p > first else 0, t) for p, t in pairs]  # OpenAI: the first has no logprob
                pairs += [(n_prompt + i, t) for i, t in enumerate(completion)]
                lp = lp_dict(pairs, 0, b"")
            else:
                lp = lp_dict([(n_prompt + i, t) for i, t in enumerate(completion)], len(prompt_text), b"")
        out = chunk(text, lp, finish)
        out["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": len(completion),
                        "total_tokens": n_prompt + len(completion)}
        yield out

    def _generation_end(self, n_prompt, n_completion, finish, seconds, t_first, before):
        stats = self._engine.pager.stats.delta(before)
        decode_s = max(seconds - (t_first or 0.0), 1e-9)
        stats.update(prompt_tokens=n_prompt, completion_tokens=n_completion, finish_reason=finish,
                     seconds=seconds, time_to_first_token=t_first,
                     tokens_per_second=(n_completion - 1) / decode_s if n_completion > 1 else 0.0,
                     model=self.model_path)
        self._hooks.on_generation_end(stats=stats)
        if self.verbose:
            print(f"flashmoe: {n_prompt} prompt + {n_completion} tokens in {seconds:.2f} s "
                  f"({stats['tokens_per_second']:.1f} tok/s) | experts: {stats['hits']} hits, {stats['misses']} misses, "
                  f"{stats['bytes_read'] / 2**20:.1f} MiB read", file=sys.stderr)
