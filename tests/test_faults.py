"""The `faulty` storage reader (pager/faulty.py) and what the pager, the engine, Llama and `flashmoe
run` do with EIO, short reads, delays and bit flips (issue 16). Oracle: the same computation
with the `native` reader, bit for bit."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashmoe_plugin.io import ChecksumError, ReadError, crc32c
from flashmoe_plugin.pager.faulty import FaultyReader, parse_faults
from flashmoe_plugin.runtime.engine import Engine
from flashmoe_plugin.store.format import StoreError

DEMO = Path(__file__).parent.parent / "flashmoe_plugin" / "demo_model" / "store"
PROMPT = [5, 77, 301, 1200, 42, 9, 4000, 17]
REC = 4096


def engine(faults=None, **kw):
    opts = dict(ram_budget=12 * 57344, prefetch="off", io_threads=2)  # 12 records: many reads
    opts.update(kw)
    if faults is not None:
        opts.update(storage="faulty", storage_options={"faults": faults})
    return Engine(DEMO, **opts)


@pytest.fixture(scope="module")
def clean():
    eng = engine()
    out = eng.forward(PROMPT)
    eng.close()
    return out


def test_spec_errors_name_the_item():
    for bad in ("eio@x:1", "melt@1:1", "rate=2", "kinds=eio+rot"):
        with pytest.raises(ValueError, match="faults"):
            parse_faults(bad)
    rules, rate, seed, kinds = parse_faults("eio@0:3#1-2, delay=20@*:*#*, rate=0.1, seed=4, kinds=flip")
    assert [r.kind for r in rules] == ["eio", "delay"] and rules[0].nth == (1, 2) and rules[1].ms == 20
    assert (rate, seed, kinds) == (0.1, 4, ("flip",))


def test_each_kind_on_a_plain_file(tmp_path):
    data = os.urandom(8 * REC)
    path = tmp_path / "experts" / "layer_003.bin"
    path.parent.mkdir()
    path.write_bytes(data)
    with FaultyReader(nthreads=1, faults="eio@3:1#1,short@3:2,flip@3:4,delay=30@3:5#1") as r:
        fid = r.open(path)

        def read(e, crc=True):
            buf = bytearray(REC)
            r.read([(fid, e * REC, REC, buf, crc32c(data[e * REC:(e + 1) * REC]) if crc else None)])
            return bytes(buf)
        with pytest.raises(ReadError) as ei:
            read(1)
        assert ei.value.kind == "os" and ei.value.errno == 5 and str(path) in str(ei.value)
        assert read(1) == data[REC:2 * REC]  # only the first read of expert 1 fails
        for _ in range(2):
            with pytest.raises(ReadError) as ei:
                read(2)
            assert ei.value.kind == "short"
        with pytest.raises(ChecksumError):
            read(4)
        flipped = read(4, crc=False)  # unverified: the flip goes through, one bit
        diff = [a ^ b for a, b in zip(flipped, data[4 * REC:5 * REC]) if a != b]
        assert len(diff) == 1 and bin(diff[0]).count("1") == 1
        t = r.submit([(fid, 5 * REC, REC, bytearray(REC), None)])
        assert not t.done()  # delayed
        t.wait()
        assert t.done() and read(0) == data[:REC]
        assert r.injected == {"eio": 1, "short": 2, "flip": 2, "delay": 1}


@pytest.mark.parametrize("kind", ["eio", "short", "flip", "delay=5"])
def test_transient_faults_are_retried_and_change_nothing(clean, kind):
    eng = engine(f"{kind}@*:*#1")  # the first read of every record fails
    out = eng.forward(PROMPT)
    st, reader = eng.pager.stats, eng.pager.reader
    eng.close()
    assert torch.equal(out, clean)
    assert sum(reader.injected.values()) == st.misses > 0
    assert st.read_retries == (0 if kind.startswith("delay") else st.misses) and st.read_failures == 0


@pytest.mark.parametrize("kind", ["eio", "short", "flip"])
def test_persistent_fault_fails_the_request_naming_file_layer_expert_then_the_next_one_runs(clean, kind):
    probe = engine("")
    probe.forward(PROMPT)
    layer, expert = next((l, e) for l, e, _, _ in probe.pager.reader.log if l == 2)
    probe.close()
    eng = engine(f"{kind}@{layer}:{expert}#1-3")  # three attempts fail: one try and two retries
    with pytest.raises(StoreError) as ei:
        eng.forward(PROMPT)
    msg = str(ei.value)
    assert f"layer_{layer:03d}.bin" in msg and f"layer {layer} expert {expert}" in msg and "3 attempts" in msg
    assert (layer, expert) not in eng.pager.t0  # bytes that failed were never installed
    assert eng.n_past == 0
    out = eng.forward(PROMPT)  # the engine serves the next request (4th read of that record: fine)
    eng.close()
    assert torch.equal(out, clean)


def test_seeded_random_faults_over_a_generation(clean):
    eng = engine("rate=0.2,seed=11")
    outs = [eng.forward(PROMPT)] + [eng.forward([t]) for t in (3, 99, 512, 7)]
    st, injected = eng.pager.stats, eng.pager.reader.injected
    eng.close()
    ref = engine()
    refs = [ref.forward(PROMPT)] + [ref.forward([t]) for t in (3, 99, 512, 7)]
    ref.close()
    assert all(torch.equal(a, b) for a, b in zip(outs, refs))
    assert sum(injected.values()) >= 10 and st.read_failures == 0 and st.read_retries >= injected["eio"]


def test_llama_fails_the_request_cleanly_and_serves_the_next():
    from flashmoe_plugin import Llama
    kw = dict(n_ctx=256, verbose=False, ram_budget=12 * 57344, prefetch=False, io_threads=2)
    ref = Llama(str(DEMO), storage="faulty", storage_options={"faults": ""}, **kw)
    want = ref("Once upon a time", max_tokens=6, temperature=0)["choices"][0]["text"]
    expert = next(e for l, e, _, _ in ref._engine.pager.reader.log if l == 1)
    ref.close()
    llm = Llama(str(DEMO), storage="faulty", storage_options={"faults": f"eio@1:{expert}#1-3"}, **kw)
    with pytest.raises(StoreError, match=f"layer 1 expert {expert}: reading"):
        llm("Once upon a time", max_tokens=6, temperature=0)
    got = llm("Once upon a time", max_tokens=6, temperature=0)["choices"][0]["text"]
    llm.close()
    assert got == want


def test_cli_run_reports_a_persistent_fault_without_a_traceback():
    env = dict(os.environ, FLASHMOE_FAULTS="eio@0:*#*")
    run = subprocess.run([sys.executable, "-c", "from flashmoe_plugin.cli import main; main()", "run", str(DEMO),
                          "-p", "Hello", "-n", "3", "--storage", "faulty", "--prefetch", "off"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "layer 0 expert" in run.stderr and "Input/output error" in run.stderr
    plugins = subprocess.run([sys.executable, "-c", "from flashmoe_plugin.cli import main; main()", "plugins"],
                             capture_output=True, text=True, timeout=300)
    assert "faulty" in plugins.stdout and "native" in plugins.stdout
