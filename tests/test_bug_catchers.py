"""Tests written to catch bugs that a mutation check planted unnoticed (issue 16,
tests/tools/planted_bugs.py): LFU against a hand-worked trace, Store.verify on the dense file,
Engine.forward keeping every chunk's logits, and the adapter's logprobs normalised."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from flashmoe_plugin.pager.policies import LFU
from flashmoe_plugin.runtime.engine import Engine
from flashmoe_plugin.store.format import DENSE, Store

DEMO = Path(__file__).parent.parent / "flashmoe_plugin" / "demo_model" / "store"


def test_lfu_hand_worked_trace():
    p = LFU(3)
    p.insert("A"); p.insert("B"); p.touch("A"); p.touch("A"); p.insert("C"); p.touch("B")  # noqa: E702
    # uses so far: A 3, B 2, C 1
    assert p.victim(set()) == "C"
    assert p.victim({"C"}) == "B"
    p.remove("C")
    p.insert("D")                  # D 1 (counts survive eviction: C would come back with 2)
    assert p.victim(set()) == "D"
    p.touch("D"); p.touch("D")     # noqa: E702  D 3: now B (2) is the least used
    assert p.victim(set()) == "B"
    p.touch("B")                   # A 3, B 3, D 3: a tie goes to the least recently used: A
    assert p.victim(set()) == "A"
    p.remove("A")
    p.insert("C")                  # C 2 (it had 1 before its eviction)
    assert p.victim(set()) == "C"


def test_verify_checks_the_dense_file(tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(DEMO, dst)
    assert Store.open(dst).verify() == []
    dense = dst / DENSE
    data = bytearray(dense.read_bytes())
    data[len(data) // 2] ^= 0x40
    dense.write_bytes(bytes(data))
    problems = Store.open(dst).verify()
    assert problems == [f"{DENSE}: checksum mismatch"]


def test_forward_keeps_the_logits_of_every_chunk():
    ids = [5, 77, 301, 1200, 42, 9, 4000, 17, 8, 640]
    whole = Engine(DEMO, prefetch="off")
    ref = whole.forward(ids)
    whole.close()
    chunked = Engine(DEMO, prefetch="off", n_batch=3)
    out = chunked.forward(ids)
    assert chunked.n_past == len(ids)
    chunked.close()
    assert out.shape == ref.shape == (len(ids), ref.shape[-1])
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)


def test_completion_logprobs_are_log_softmax_of_the_logits():
    from flashmoe_plugin import Llama
    llm = Llama(str(DEMO), n_ctx=128, verbose=False, prefetch=False)
    prompt = "Once upon a time"
    out = llm(prompt, max_tokens=2, temperature=0, logprobs=4)
    lp = out["choices"][0]["logprobs"]
    ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
    llm.close()
    eng = Engine(DEMO, prefetch="off")
    ref = torch.log_softmax(eng.forward(ids)[-1].double(), -1)
    eng.close()
    top = sorted(lp["top_logprobs"][0].values(), reverse=True)
    want = torch.topk(ref, 4).values.tolist()
    assert top == pytest.approx(want, abs=1e-4)
    assert lp["token_logprobs"][0] == pytest.approx(want[0], abs=1e-4)
