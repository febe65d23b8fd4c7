"""A CPU decode step runs torch's own ops on one thread while the native kernels keep their pool
(runtime/torch_threads.py); prefill keeps torch's threads; the caller's count comes back, also
after an error; the logits are those of a step with torch on two threads."""
from pathlib import Path

import pytest
import torch

import flashmoe_plugin.runtime.engine as engine_mod
from flashmoe_plugin.runtime.engine import Engine
from flashmoe_plugin.runtime.torch_threads import torch_on_one_thread

DEMO = Path(engine_mod.__file__).resolve().parents[1] / "demo_model" / "store"


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def test_decode_step_on_one_torch_thread(two_threads, monkeypatch):
    eng = Engine(DEMO, prefetch="off")
    pool = eng.backend.num_threads  # the backend is shared: created with the session's torch threads
    eng.backend.set_num_threads(2)
    assert eng.backend.name == "cpu"
    seen = []
    experts = eng._experts
    monkeypatch.setattr(eng, "_experts", lambda *a: (seen.append(torch.get_num_threads()), experts(*a))[1])
    ids = [5, 17, 200, 33, 9]
    prefill = eng.forward(ids)
    assert set(seen) == {2} and torch.get_num_threads() == 2
    seen.clear()
    step = eng.forward([42])
    assert set(seen) == {1} and torch.get_num_threads() == 2
    assert eng.backend.num_threads == 2  # the native pool is not torch's: it keeps both cores
    # the same step with torch on two threads: the same logits (the native kernels compute the matrices)
    monkeypatch.setattr(engine_mod, "torch_on_one_thread", lambda active=True: torch_on_one_thread(False))
    eng.truncate(len(ids))
    torch.testing.assert_close(eng.forward([42]), step, atol=1e-5, rtol=1e-5)
    assert prefill.shape[0] == len(ids)
    eng.backend.set_num_threads(pool)
    eng.close()


def test_thread_count_restored_after_an_error(two_threads):
    with pytest.raises(RuntimeError):
        with torch_on_one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    with torch_on_one_thread(False):
        assert torch.get_num_threads() == 2
