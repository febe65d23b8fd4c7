"""`n_cpu_moe` as a static placement (runtime/engine.py, runtime/cpu_layers.py): the other layers'
experts are loaded into the device tier at start when it holds them all (a decode step never waits
on the disk for an expert the prompt did not choose: the H200's row 1 read one from a dropped page
cache mid-decode, rival-h200.json session 8), and the CPU layers' records sit in huge pages."""
import torch

from flashmoe_plugin.io import HUGE_PAGE, aligned_empty
from flashmoe_plugin.runtime.engine import Engine


def test_the_other_layers_are_loaded_at_start_when_they_fit(oracles):
    store = oracles("mixtral").store("q4")
    ref = Engine(store, prefetch="off")
    size, k, layers = ref.pager.record_size, ref.config.top_k, sorted(ref.store.layers)
    experts = ref.store.layers[layers[0]].experts
    ids = torch.randint(3, 384, (4,), generator=torch.Generator().manual_seed(1)).tolist()
    want = ref.forward(ids)[-1]
    ref.close()
    paged = (len(layers) - 1) * experts
    eng = Engine(store, n_cpu_moe=1, ram_budget=paged * size, prefetch="off")
    p = eng.pager
    assert p.stats.preloaded == paged
    assert sorted(p.t0.slot_of) == [(l, e) for l in layers[1:] for e in range(experts)]
    got = eng.forward(ids)[-1]
    assert p.stats.misses == 0 and p.stats.hits > 0
    eng.close()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # a device tier that cannot hold them all is filled by use, as before
    eng = Engine(store, n_cpu_moe=1, ram_budget=k * size, prefetch="off")
    assert eng.pager.stats.preloaded == 0
    eng.forward(ids)
    assert eng.pager.stats.misses > 0
    eng.close()


def test_huge_page_memory_is_aligned_and_usable():
    t = aligned_empty(3 * HUGE_PAGE + 4096, huge=True, zero=True)
    assert t.data_ptr() % HUGE_PAGE == 0 and t.numel() == 3 * HUGE_PAGE + 4096
    assert int(t.sum()) == 0
    t[-1] = 7
    assert int(t.sum()) == 7
    assert aligned_empty(0, huge=True).numel() == 0
