"""Decode timed from a context of a given depth, as llama-bench times it.

llama-bench's decode figure (its `tg N` test) decodes N tokens from an EMPTY context (`-d D` puts
D tokens of context first), while `flashmoe bench` decodes after its prompt (512 tokens by
default): attention over 512 positions costs a GPU decode token ~5 us a layer more than over a few.
`--depth D` measures the same engine again the llama-bench way, so the two figures compare like
for like; the decode after the prompt stays the bench's main figure (the pager's statistics are
its)."""
from __future__ import annotations


def decode_at_depth(engine, ids: list[int], depth: int, n: int, temp: float, seed: int, progress) -> dict:
    """n decode steps after `depth` tokens of context (the prompt's ids, repeated as needed). At
    depth 0 the context is one token (the prompt's first, at position 0, untimed: the first step
    needs logits to sample from), so the n steps run at positions 1..n where llama-bench's run at
    0..n-1."""
    from .store import _decode
    ctx = (ids * (max(depth, 1) // len(ids) + 1))[:max(depth, 1)]
    engine.reset()
    logits = engine.forward(ctx, last_only=True)[-1]
    start = engine.n_past
    progress.stage(f"decode at depth {depth}", total=n)
    secs, token_s = _decode(engine, logits, n, temp, seed, progress)
    return {"depth": depth, "tok_s": n / secs, "token_ms": [round(t * 1e3, 3) for t in token_s],
            "positions": [start, engine.n_past - 1], "method": __doc__.split("\n\n")[1].replace("\n", " ")}
