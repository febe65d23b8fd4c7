"""The CPU engine's dense dtype default: fp32 while the experts and an fp32 dense part fit the free
RAM, else the stored bf16 (RAM goes to the expert cache), and the logits of that engine are those
of an explicit dtype=torch.bfloat16 engine."""
from pathlib import Path

import torch

import flashmoe_plugin.runtime.engine as engine_mod
from flashmoe_plugin.runtime.engine import Engine

DEMO = Path(engine_mod.__file__).resolve().parents[1] / "demo_model" / "store"


def test_dense_dtype_follows_free_ram(monkeypatch):
    roomy = Engine(DEMO, prefetch="off", ram_budget="100%")
    assert roomy.dtype == torch.float32
    need = roomy.store.expert_bytes + 2 * roomy._dense_stored_bytes()
    roomy.close()
    monkeypatch.setattr(engine_mod, "available_ram", lambda: need - 1)
    tight = Engine(DEMO, prefetch="off", ram_budget="100%")
    assert tight.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in tight.model.w.values() if t.is_floating_point())
    ref = Engine(DEMO, prefetch="off", ram_budget="100%", dtype=torch.bfloat16)
    ids = [5, 17, 200, 33, 9]
    torch.testing.assert_close(tight.forward(ids), ref.forward(ids), atol=0, rtol=0)
    tight.close()
    ref.close()
