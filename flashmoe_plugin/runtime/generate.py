"""The generation loop: reuse the cached prefix, prefill the rest in batches, then decode token
by token; text is streamed as whole UTF-8 characters and held back while it could still turn
into a stop string."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from . import pipelined
from .sampling import Sampler, SamplingParams


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokens(engine, prompt: list[int], sampler: Sampler, on_token=None) -> Iterator[int]:
    """Endless stream of sampled tokens after `prompt` (the caller decides when to stop)."""
    if not prompt:
        raise ValueError("empty prompt: nothing to condition on")
    keep = common_prefix(engine.tokens, prompt)
    if keep == len(prompt):  # everything cached: recompute the last position for its logits
        keep -= 1
    engine.truncate(keep)
    logits = engine.forward(prompt[keep:], last_only=True)[-1]
    if not pipelined.why_not(engine, sampler):  # the next step queued before this one is read
        yield from pipelined.Pipeline.of(engine).tokens(logits, sampler, on_token)
        return
    while True:
        tok = sampler(logits, engine.tokens)
        if on_token:
            on_token(tok)
        yield tok
        logits = engine.forward([tok], last_only=True)[-1]


@dataclass
class Piece:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


def complete(engine, prompt: list[int], params: SamplingParams, max_tokens: int | None = 16,
             stop: list[str] | None = None, stop_ids: set[int] | None = None, on_token=None) -> Iterator[Piece]:
    """Stream text pieces; the last piece carries finish_reason 'stop' or 'length'."""
    stops = [s.encode() for s in (stop or []) if s]
    tok = engine.tokenizer
    stop_ids = set(stop_ids if stop_ids is not None else ([tok.eos_id] if tok.eos_id is not None else []))
    room = engine.n_ctx - len(prompt)
    limit = room if max_tokens is None or max_tokens <= 0 else min(max_tokens, room)
    buf, emitted, ids, reason = b"", 0, [], "length"
    gen = tokens(engine, prompt, Sampler(params), on_token) if limit > 0 else iter(())
    for n, t in enumerate(gen, 1):
        if t in stop_ids:
            reason = "stop"
            break
        ids.append(t)
        buf += tok.token_bytes(t)
        hits = [i for i in (buf.find(s) for s in stops) if i >= 0]
        if hits:
            buf, reason = buf[:min(hits)], "stop"
            break
        safe = utf8_complete(buf, len(buf) - stop_holdback(buf, stops))
        if safe > emitted:
            yield Piece(buf[emitted:safe].decode("utf-8", errors="ignore"), ids)
            emitted, ids = safe, []
        if n >= limit:
            break
    yield Piece(buf[emitted:].decode("utf-8", errors="ignore"), ids, reason)


def utf8_complete(buf: bytes, end: int) -> int:
    """The largest cut <= end such that buf[:cut] does not end inside a UTF-8 character."""
    for back in range(1, min(4, end) + 1):
        b = buf[end - back]
        if b & 0xC0 == 0x80:          # continuation byte: keep looking for the lead byte
            continue
        if b & 0x80 == 0:             # ASCII
            return end
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return end if back >= need else end - back
    return end


def stop_holdback(buf: bytes, stops: list[bytes]) -> int:
    """How many trailing bytes could still become the start of a stop sequence."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(buf)), 0, -1):
            if buf.endswith(s[:k]):
                best = max(best, k)
                break
    return best
