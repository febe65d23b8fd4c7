"""The fused decode layer (runtime/fused_decode.py) on CPU: its torch references are the CPU twin
of csrc/cuda/fm_decode.cu's three kernels.

Oracle: the device step through decode_ops.py's functions (FLASHMOE_DECODE_FUSED=0), which
tests/test_graph_decode.py checks against the engine's ordinary decode: the fused structure
computes the same operations in the same order, so the logits must be torch.equal, in every
family the device step computes, with and without misses."""
import pytest
import torch
from conftest import run_sequence

from flashmoe_plugin.runtime.engine import Engine
from flashmoe_plugin.runtime.graph_decode import unsupported


def _run(store, steps_env, monkeypatch, **kw):
    monkeypatch.setenv("FLASHMOE_DECODE_FUSED", steps_env)
    g = torch.Generator().manual_seed(5)
    ids, steps = torch.randint(3, 384, (10,), generator=g).tolist(), torch.randint(3, 384, (6,), generator=g).tolist()
    eng = Engine(store, prefetch="off", decode_graph="on", **kw)
    try:
        return run_sequence(eng, ids, steps), eng.fast.fused, eng.fast.fused_note, eng.fast.fallbacks
    finally:
        eng.close()


def test_fused_twin_equals_the_decode_ops_step(oracles, family, monkeypatch):
    store = oracles(family).store("q4")
    probe = Engine(store, prefetch="off")
    why, size, k = unsupported(probe), probe.pager.record_size, probe.config.top_k
    probe.close()
    if why:
        return  # test_graph_decode checks the refusal
    for budget in (None, k * size):  # everything resident; one layer's worth (misses, fallbacks)
        kw = {} if budget is None else {"ram_budget": budget}
        fused, layers, note, fb = _run(store, "1", monkeypatch, **kw)
        plain, none, why_off, _ = _run(store, "0", monkeypatch, **kw)
        assert layers is not None and not layers.native, note
        assert none is None and why_off == "FLASHMOE_DECODE_FUSED=0"
        assert torch.equal(fused, plain), (family, budget)
        if budget is not None:
            assert fb > 0


def test_off_by_default(oracles, monkeypatch):
    monkeypatch.delenv("FLASHMOE_DECODE_FUSED", raising=False)
    eng = Engine(oracles("mixtral").store("q4"), prefetch="off", decode_graph="on")
    try:
        assert eng.fast.fused is None and "FLASHMOE_DECODE_FUSED=1" in eng.fast.fused_note
    finally:
        eng.close()


def test_unfusable_models_keep_the_decode_ops_step(oracles, monkeypatch):
    from flashmoe_plugin.runtime import graph_decode
    store = oracles("mixtral").store("q4")
    monkeypatch.setattr(graph_decode, "unfusable", lambda engine: "head_dim 512 (test)")
    monkeypatch.setenv("FLASHMOE_DECODE_FUSED", "1")
    eng = Engine(store, prefetch="off", decode_graph="on")
    try:
        assert eng.fast.fused is None and eng.fast.fused_note == "head_dim 512 (test)"
        assert torch.isfinite(eng.forward([5, 6, 7])).all() and torch.isfinite(eng.forward([8])).all()
    finally:
        eng.close()
