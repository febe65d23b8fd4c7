"""The generation loop: reuse the cached prefix, prefill the rest in batches, then decode token
by token; text is streamed as whole UTF-8 characters and held back while it could still turn
into a stop string."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

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
    stop = [s for s in (stop or []) if s]
    stop_ids = set(stop_ids if stop_ids is not None else ([engine.tokenizer.eos_id] if engine.tokenizer.eos_id is not None else []))
    room = engine.n_ctx - len(prompt)
    limit = room if max_tokens is None or max_tokens <= 0 else min(max_tokens, room)
    pending, text_out, ids = b"", "", []
    sampler = Sampler(params)
    gen = tokens(engine, prompt, sampler, on_token) if limit > 0 else iter(())
    reason = "length"
    for n, tok in enumerate(gen, 1):
        if tok in stop_ids:
            reason = "stop"
            break
        ids.append(tok)
        pending += engine.tokenizer.token_bytes(tok)
        text, pending = _utf8_split(pending)
        text_out += text
        hit = min((i for i in (text_out.find(s) for s in stop) if i >= 0), default=-1)
        if hit >= 0:
            text_out, reason = text_out[:hit], "stop"
            break
        safe = len(text_out) - _held_back(text_out, stop)
        if safe > 0:
            yield Piece(text_out[:safe], ids)
            text_out, ids = text_out[safe:], []
        if n >= limit:
            break
    if reason == "length":
        text_out += pending.decode("utf-8", errors="replace")
    yield Piece(text_out, ids, reason)


def _utf8_split(buf: bytes) -> tuple[str, bytes]:
    """Decode the longest prefix of complete UTF-8 characters; keep the incomplete tail."""
    for cut in range(len(buf), max(len(buf) - 4, -1), -1):
        try:
            return buf[:cut].decode("utf-8"), buf[cut:]
        except UnicodeDecodeError:
            continue
    return buf.decode("utf-8", errors="replace"), b""


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best
