import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hf_oracles import FAMILIES, HYBRID, make_model  # noqa: E402


class Oracle:
    """A transformers model saved to disk (fp32) and, on demand, converted stores of it."""

    def __init__(self, family, root: Path):
        self.family, self.root = family, root
        self.hf_dir = root / "hf"
        self.model, self.tokenizer = make_model(family, self.hf_dir)
        self._stores = {}

    def store(self, quant="none"):
        if quant not in self._stores:
            from flashmoe_plugin.convert import convert
            self._stores[quant] = convert(self.hf_dir, self.root / f"store-{quant}", quant=quant)
        return self._stores[quant]


@pytest.fixture(scope="session")
def oracles(tmp_path_factory):
    cache = {}

    def get(family) -> Oracle:
        if family not in cache:
            cache[family] = Oracle(family, tmp_path_factory.mktemp(family))
        return cache[family]
    return get


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(params=sorted(HYBRID))
def hybrid_family(request):
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    # The oracle models are tiny: on a 2-core CI machine extra threads only add overhead.
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_sequence(eng, ids, steps):
    """Prefill, then decode fixed tokens; all logits."""
    import torch
    out = [eng.forward(ids)]
    out += [eng.forward([t]) for t in steps]
    return torch.cat(out)


@pytest.fixture
def profiled(oracles, family, tmp_path):
    """A copy of the oracle store with routing_stats.json and a routing trace of a reference run
    (all experts resident, no prefetch); returns (store, prompt ids, decode ids, reference logits)."""
    import shutil

    import torch

    from flashmoe_plugin.pager.trace import TRACE_FILE, RoutingTrace, write_routing_stats
    from flashmoe_plugin.runtime.engine import Engine
    store = tmp_path / "store"
    shutil.copytree(oracles(family).store("none"), store)
    g = torch.Generator().manual_seed(7)
    ids, steps = torch.randint(3, 384, (24,), generator=g).tolist(), torch.randint(3, 384, (10,), generator=g).tolist()
    eng = Engine(store, prefetch="off")
    trace = RoutingTrace()
    eng.record(trace)
    ref = run_sequence(eng, ids, steps)
    eng.close()
    trace.save(store / TRACE_FILE)
    cfg = eng.config
    write_routing_stats(store, trace.counts(cfg.num_experts), trace.tokens(), cfg.top_k, cfg.num_experts)
    return store, ids, steps, ref


@pytest.fixture(scope="session", autouse=True)
def _close_llama_cpp_devnull():
    # llama-cpp-python opens two /dev/null files at import (llama_cpp/_utils.py) and never closes
    # them, so interpreter exit reports them as two ResourceWarnings after the test summary.
    yield
    utils = sys.modules.get("llama_cpp._utils")
    if utils is not None:
        import gc
        gc.collect()  # llama_cpp objects still alive use these files in __del__
        for name in ("outnull_file", "errnull_file"):
            f = getattr(utils, name, None)
            if f is not None and not f.closed:
                f.close()


@pytest.fixture(scope="module")
def llm():
    """The embedded demo model behind the Llama drop-in, one per test module."""
    from flashmoe_plugin import Llama
    with Llama(model_path="demo", n_ctx=1024, verbose=False) as m:
        yield m
