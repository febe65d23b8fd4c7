"""The CPU expert tier in transparent huge pages (pager.ExpertPager(huge_pages=True), opt-in): the
pool is 2 MiB aligned and advised before its first touch, records land in it by buffered and
O_DIRECT reads alike, and the logits are bit-equal to a pool in 4 KiB pages (the default)."""
import torch
from conftest import run_sequence

from flashmoe_plugin.io import HUGE_PAGE
from flashmoe_plugin.runtime.engine import Engine


def test_the_cpu_tier_in_huge_pages_gives_the_same_logits(oracles):
    store = oracles("mixtral").store("q4")
    ids = torch.randint(3, 384, (6,), generator=torch.Generator().manual_seed(3)).tolist()
    steps = [5, 17, 42, 99]
    probe = Engine(store, prefetch="off")
    size, k = probe.pager.record_size, probe.config.top_k
    probe.close()
    outs = {}
    for huge in (False, True):
        for direct in (False, True):
            eng = Engine(store, ram_budget=(k + 1) * size, direct_io=direct, prefetch="off",
                         pager_options={"huge_pages": huge})
            slots = eng.pager.t0.slots
            if huge:
                assert slots.data_ptr() % HUGE_PAGE == 0
            outs[huge, direct] = run_sequence(eng, ids, steps)
            assert eng.pager.stats.misses > 0  # the records came through the reads under test
            eng.close()
    ref = outs[False, False]
    for key, out in outs.items():
        assert torch.equal(out, ref), key
