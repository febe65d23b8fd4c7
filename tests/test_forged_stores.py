"""Forged and damaged manifests are refused at Store.open, before any read, by a StoreError naming
the field (issue 16). Each case changes one thing in a valid store (synth --like tiny)."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest

from flashmoe_plugin.store.format import MANIFEST, Store, StoreError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from flashmoe_plugin.convert.synth import synth
    dst = tmp_path_factory.mktemp("forged") / "tiny"
    synth(dst, "tiny", seed=3)
    return dst


@pytest.fixture
def forge(tiny, tmp_path):
    """forge(edit) -> a copy of the tiny store whose manifest dict went through edit(m)."""
    def make(edit):
        dst = tmp_path / "store"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(tiny, dst)
        m = json.loads((dst / MANIFEST).read_text())
        edit(m)
        (dst / MANIFEST).write_text(json.dumps(m))
        return dst
    return make


def set_in(path, value):
    def edit(m):
        d = m
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return edit


CASES = {
    # name: (edit, the field the message must name)
    "fewer experts than config.num_experts": (set_in(["layers", 0, "experts"], 7), "layers[0].experts"),
    "top_k above the expert count": (set_in(["config", "top_k"], 9), "config.top_k"),
    "part offset 2^63": (set_in(["expert_record", "parts", 1, "offset"], 2**63), "expert_record.parts[1].offset"),
    "part offset outside the record": (set_in(["expert_record", "parts", 1, "offset"], 1 << 20), "expert_record.parts[1]"),
    "part shape beyond the record": (set_in(["expert_record", "parts", 0, "shape"], [1024, 128]), "expert_record.parts[0]"),
    "q4 bytes declared as q2": (lambda m: [p.update(format="q2") for p in m["expert_record"]["parts"]], "format"),
    "record size": (set_in(["expert_record", "size"], 4096), "expert_record.size"),
    "absolute layer path": (set_in(["layers", 0, "file"], "/etc/hostname"), "layers[0].file"),
    "dotdot layer path": (set_in(["layers", 1, "file"], "experts/../../outside.bin"), "layers[1].file"),
    "layer path outside experts/": (set_in(["layers", 1, "file"], "dense.safetensors"), "layers[1].file"),
    "negative expert count": (set_in(["layers", 0, "experts"], -1), "layers[0].experts"),
    "string where a number goes": (set_in(["config", "hidden_size"], "128"), "config.hidden_size"),
    "bool where a number goes": (set_in(["expert_record", "size"], True), "expert_record.size"),
    "checksum beyond 32 bits": (lambda m: m["checksums"]["experts"]["0"].__setitem__(3, 2**40), "checksums.experts.0[3]"),
    "checksums missing": (lambda m: m["checksums"]["experts"].pop("1"), "checksums.experts.1"),
    "duplicate layer": (set_in(["layers", 1, "index"], 0), "layers[1].index"),
    "layer index beyond num_layers": (set_in(["layers", 1, "index"], 99), "layers[1].index"),
    "moe layer missing": (lambda m: m["layers"].pop(), "layers"),
    "zero top_k": (set_in(["config", "top_k"], 0), "config.top_k"),
    "heads not a multiple of kv heads": (set_in(["config", "num_kv_heads"], 3), "config.num_heads"),
    "layers not a list": (set_in(["layers"], {"0": 1}), "layers"),
    "parts empty": (set_in(["expert_record", "parts"], []), "expert_record.parts"),
    "unknown part format": (set_in(["expert_record", "parts", 0, "format"], "q3"), "expert_record.parts[0].format"),
    "nan eps": (set_in(["config", "rms_norm_eps"], float("nan")), "config.rms_norm_eps"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forged_manifest_is_refused_naming_the_field(forge, case):
    edit, field = CASES[case]
    store = forge(edit)
    with pytest.raises(StoreError) as ei:
        Store.open(store)
    assert field in str(ei.value) and MANIFEST in str(ei.value), str(ei.value)


def test_the_untouched_copy_opens(forge):
    Store.open(forge(lambda m: None))


def test_random_bytes_changed_in_the_manifest(tiny, tmp_path):
    """Random byte flips: Store.open either accepts the manifest (a change in a free-text field,
    or one that leaves it valid) or raises StoreError; `inspect --verify` never shows a traceback."""
    rnd = random.Random(16)
    raw = (tiny / MANIFEST).read_bytes()
    dst = tmp_path / "store"
    shutil.copytree(tiny, dst)
    refused = 0
    for trial in range(150):
        b = bytearray(raw)
        for _ in range(rnd.randint(1, 4)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        (dst / MANIFEST).write_bytes(bytes(b))
        try:
            Store.open(dst)
        except StoreError:
            refused += 1
    assert refused > 50
    for b in (raw.replace(b'"experts": 8', b'"experts": 9', 1), raw[:-7] + b"\xff\xfe{}]}}"):
        (dst / MANIFEST).write_bytes(b)
        run = subprocess.run([sys.executable, "-c", "from flashmoe_plugin.cli import main; main()", "inspect",
                              str(dst), "--verify"], capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert MANIFEST in run.stderr
