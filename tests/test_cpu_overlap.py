"""Issue 10 on a small CPU: a decode step computes its resident experts while the missing records
are read (runtime/landed.py), O_DIRECT and a q8 dense part become the defaults when the RAM cannot
hold the experts, and the one-pass q8 quantizer behind that default equals its torch reference.
Oracles: the same engine without delays (bit for bit), quant.py's reference (bit for bit)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashmoe_plugin.runtime.engine as engine_mod
import flashmoe_plugin.runtime.landed as landed
from flashmoe_plugin import quant
from flashmoe_plugin.kernels.quantize import quantize
from flashmoe_plugin.pager.pager import default_direct_io
from flashmoe_plugin.runtime.engine import Engine

DEMO = Path(engine_mod.__file__).resolve().parents[1] / "demo_model" / "store"
PROMPT, STEPS = [5, 77, 301, 1200, 42, 9, 4000, 17], [3, 99, 512, 7, 1000, 250]


def run(eng):
    outs = [eng.forward(PROMPT, last_only=True)] + [eng.forward([t]) for t in STEPS]
    eng.close()
    return torch.cat(outs)


def test_resident_experts_run_while_the_missing_records_are_read(monkeypatch):
    monkeypatch.setattr(landed, "MIN_RECORD_BYTES", 0)  # the demo's records are 56 KiB
    opts = dict(ram_budget=12 * 57344, prefetch="off", io_threads=2)  # 12 of 256 records: misses
    ref = run(Engine(DEMO, **opts))
    pending = []
    real = landed.expert_out

    def spy(backend, x, record, weight, layout):
        pending.append(sum(not r.ticket.done() for r in eng.pager.reads.values()))
        return real(backend, x, record, weight, layout)
    monkeypatch.setattr(landed, "expert_out", spy)
    # every read of layers 2 and 5 lands 30 ms late: a step's resident experts there must not wait
    eng = Engine(DEMO, storage="faulty", storage_options={"faults": "delay=30@2:*#*,delay=30@5:*#*"}, **opts)
    out = run(eng)
    assert torch.equal(out, ref)  # landing order never changes the sum
    assert max(pending) > 0, "every expert waited for all of its step's reads"


def test_fused_call_equals_the_per_expert_sum_in_routing_order():
    """What lets a step use one fused call when its records are resident and per-expert calls
    when it waits, with the same bits either way."""
    eng = Engine(DEMO, prefetch="off")
    g = torch.Generator().manual_seed(5)
    for layer in range(eng.config.num_layers):
        ids = torch.randperm(eng.config.num_experts, generator=g)[:eng.config.top_k].tolist()
        recs = eng.pager.acquire(layer, ids)
        x = torch.randn(1, eng.config.hidden_size, generator=g)
        w = torch.softmax(torch.randn(len(ids), generator=g), 0)
        fused = eng.backend.moe_decode(x, recs, w, eng.store.layout)
        each = [landed.expert_out(eng.backend, x, r, w[i:i + 1], eng.store.layout) for i, r in enumerate(recs)]
        assert torch.equal(fused, landed.routing_order_sum(each)), layer
    eng.close()


def test_ready_first_orders_resident_then_in_flight_then_disk():
    eng = Engine(DEMO, ram_budget=12 * 57344, prefetch="off", io_threads=0)  # reads run when waited for
    p = eng.pager
    p.acquire(0, [3, 4])
    p.prefetch(1, [9])
    assert (1, 9) in p.reads and p.resident(0, 3)
    assert p.ready_first(0, [7, 9, 4, 3]) == [4, 3, 7, 9]
    assert p.ready_first(1, [2, 9]) == [9, 2]
    eng.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q8_absmax_native_equals_reference(dtype):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(130, 640, generator=g) * torch.logspace(-9, 3, 130)[:, None]).to(dtype)
    w[7, 64:128] = 0  # an all-zero group
    ours, ref = quantize(w, "q8", fit="absmax"), quant.quantize_q8_absmax(w)
    assert torch.equal(ours, ref)
    back = quant.dequantize(ours, "q8", tuple(w.shape))
    assert (back[7, 64:128] == 0).all()
    err = ((back - w.float()) ** 2).sum() / (w.float() ** 2).sum()
    searched = quant.dequantize(quant.quantize(w.float(), "q8"), "q8", tuple(w.shape))
    assert err < 1.1 * ((searched - w.float()) ** 2).sum() / (w.float() ** 2).sum()  # the search buys < 10% at 8 bits
    with pytest.raises(ValueError, match="q8"):
        quantize(w, "q4", fit="absmax")


def test_tight_ram_defaults_to_o_direct_and_a_q8_dense_part(monkeypatch):
    roomy = Engine(DEMO, prefetch="off", ram_budget="100%")
    assert roomy.dense_quant == "none" and not roomy.pager.reader.direct
    tight_free = roomy.store.expert_bytes + roomy._dense_stored_bytes() - 1
    ids = [5, 17, 200, 33, 9]
    roomy.close()
    assert default_direct_io(100, 99) and not default_direct_io(100, 100) and not default_direct_io()
    monkeypatch.setattr(engine_mod, "available_ram", lambda: tight_free)
    tight = Engine(DEMO, prefetch="off", ram_budget="100%")
    assert tight.dense_quant == "q8" and tight.pager.reader.direct
    # the same as asking for it (activations in bf16: the engine's rule when fp32 would not fit)
    ref = Engine(DEMO, prefetch="off", ram_budget="100%", dense_quant="q8", direct_io=False)
    assert tight.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(tight.forward(ids), ref.forward(ids), atol=0, rtol=0)
    tight.close()
    ref.close()


def test_torch_openmp_workers_sleep_unless_the_user_says_otherwise():
    code = "import flashmoe_plugin, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run_ = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True).stdout.strip()
    assert run_(env) == "PASSIVE"
    assert run_({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
