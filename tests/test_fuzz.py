"""Fuzzing (hypothesis) of what reads untrusted bytes: the store manifest (Store.open), record
layouts (store/validate.py) and the converter's safetensors header reader. Only the project's
own clear exceptions may come out; nothing may allocate by a forged number (issue 16).

CI runs a small number of examples; FLASHMOE_FUZZ_EXAMPLES=N runs more (figures in issue 16)."""
from __future__ import annotations

import copy
import json
import os
import struct

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flashmoe_plugin.convert.hf import Checkpoint, ConvertError  # noqa: E402
from flashmoe_plugin.store.format import MANIFEST, Store, StoreError  # noqa: E402
from flashmoe_plugin.store.validate import check_layout  # noqa: E402

EXAMPLES = int(os.environ.get("FLASHMOE_FUZZ_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))

NUMBERS = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 2**63 - 1, 2**64]),
                    st.floats(allow_nan=True, allow_infinity=True))
JSON = st.recursive(st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12)),
                    lambda inner: st.one_of(st.lists(inner, max_size=4),
                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from flashmoe_plugin.convert.synth import synth
    return synth(tmp_path_factory.mktemp("fuzz") / "tiny", "tiny", seed=5)


def _paths(obj, prefix=()):
    """Every (path) into a JSON value."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def test_manifest_reader(tiny, tmp_path_factory):
    raw = (tiny / MANIFEST).read_bytes()
    base = json.loads(raw)
    paths = [p for p in _paths(base) if p and p[0] != "checksums" or len(p) <= 3]
    dst = tmp_path_factory.mktemp("fuzzed")
    for f in tiny.iterdir():
        (dst / f.name).symlink_to(f)
    (dst / MANIFEST).unlink()
    seen = {"accepted": 0, "refused": 0}

    @SETTINGS
    @given(st.lists(st.tuples(st.sampled_from(paths), JSON), min_size=1, max_size=3),
           st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=3))
    def run(edits, flips):
        m = copy.deepcopy(base)
        for path, value in edits:
            if not path:
                m = value
                continue
            d = m
            try:
                for k in path[:-1]:
                    d = d[k]
                d[path[-1]] = value
            except (KeyError, IndexError, TypeError):
                pass
        data = bytearray(json.dumps(m).encode() if not flips else raw)
        for at, byte in flips:
            if at < len(data):
                data[at] = byte
        (dst / MANIFEST).write_bytes(bytes(data))
        try:
            store = Store.open(dst)
        except StoreError:
            seen["refused"] += 1
            return
        seen["accepted"] += 1
        # accepted: then every number the pager and kernels use is sane
        assert store.layout.size > 0 and all(0 <= p.offset < store.layout.size for p in store.layout.parts)
        assert all(l.experts == store.config.num_experts for l in store.layers.values())
        assert store.config.top_k <= store.config.num_experts
    run()
    (dst / MANIFEST).unlink()
    assert seen["refused"] > 0


def test_record_layouts():
    config = {"hidden_size": 128, "moe_intermediate_size": 256}
    part = st.fixed_dictionaries({"name": st.sampled_from(["w13", "w2", "x"]), "offset": NUMBERS,
                                  "format": st.sampled_from(["q4", "q2", "q8", "bf16", "f32", "q3", 4]),
                                  "shape": st.one_of(JSON, st.lists(NUMBERS, min_size=2, max_size=2))})
    record = st.fixed_dictionaries({"size": NUMBERS, "parts": st.one_of(JSON, st.lists(part, max_size=3))},
                                   optional={"align": NUMBERS})

    @SETTINGS
    @given(record, st.sampled_from(["q4", "q2", "none"]))
    def run(rec, qf):
        try:
            check_layout(rec, config, qf, "manifest.json")
        except StoreError:
            pass
    run()


def _safetensors(header_bytes: bytes, payload: bytes = b"", n=None) -> bytes:
    return struct.pack("<Q", len(header_bytes) if n is None else n) + header_bytes + payload


def test_safetensors_headers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("st")
    path = folder / "model.safetensors"
    entry = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "U8", "F64", "X"]),
                                   "shape": st.one_of(JSON, st.lists(NUMBERS, max_size=3)),
                                   "data_offsets": st.one_of(JSON, st.lists(NUMBERS, min_size=2, max_size=2))})
    header = st.one_of(JSON, st.dictionaries(st.text(max_size=6), entry, max_size=3))

    @SETTINGS
    @given(header, st.binary(max_size=256), st.one_of(st.none(), NUMBERS.filter(lambda x: isinstance(x, int))))
    def run(h, payload, n):
        raw = json.dumps(h).encode()
        n = None if n is None else n % 2**64
        path.write_bytes(_safetensors(raw, payload, n))
        try:
            ck = Checkpoint(folder)
        except ConvertError:
            return
        size = path.stat().st_size
        for name in ck.names():
            _, dtype, shape, start, end = ck.entries[name]
            assert 0 <= start <= end <= size  # get() allocates only what the file holds
            t = ck.get(name)
            assert tuple(t.shape) == shape and t.numel() * dtype.itemsize == end - start
    run()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    import gguf_oracles as G
    return G.write_tiny_gguf(tmp_path_factory.mktemp("fuzz-gguf") / "tiny.gguf", "Q8_0").read_bytes()


@SETTINGS
@given(edits=st.lists(st.tuples(st.integers(0, 16383), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 20000)))
def test_gguf_reader(tiny_gguf, tmp_path_factory, edits, cut):
    """Bytes of a GGUF file's header, metadata and tensor infos changed (and the file cut short):
    opening it gives a store or a StoreError, never another exception."""
    from flashmoe_plugin.store.gguf import GgufStore
    data = bytearray(tiny_gguf)
    for at, value in edits:
        data[at % len(data)] = value
    path = tmp_path_factory.mktemp("g") / "forged.gguf"
    path.write_bytes(bytes(data[:cut] if cut is not None else data))
    try:
        GgufStore.open(path)
    except StoreError:
        pass
