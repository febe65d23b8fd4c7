import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hf_oracles import FAMILIES, make_model  # noqa: E402


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


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    # The oracle models are tiny: on a 2-core CI machine extra threads only add overhead.
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
