"""A GGUF file is a store: Engine, Llama(model_path=...) and the CLI open it in place; shards,
the sidecar checksum index, conversion, and clear errors for bad files (nothing written)."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("gguf")
import gguf_oracles as G  # noqa: E402

from flashmoe_plugin.runtime.engine import Engine  # noqa: E402
from flashmoe_plugin.store.format import StoreError  # noqa: E402
from flashmoe_plugin.store.gguf import GgufStore  # noqa: E402

IDS = list(range(3, 40))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMOE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {k: G.write_tiny_gguf(root / f"tiny-{k}.gguf", k) for k in ("F32", "Q8_0", "Q4_0")}


def test_f32_logits_match_llama_cpp_and_budget_and_shards(tiny, tmp_path):
    pytest.importorskip("llama_cpp")
    ref, _ = G.llama_cpp_logits(tiny["F32"], IDS)
    eng = Engine(tiny["F32"])
    torch.testing.assert_close(eng.forward(IDS), ref, atol=1e-4, rtol=0)
    # a budget of one token's experts: every record read from the file's extents, same logits
    small = Engine(tiny["F32"], ram_budget=2 * eng.store.layout.size)
    torch.testing.assert_close(torch.cat([small.forward(IDS[:20])] + [small.forward([t]) for t in IDS[20:]]), ref,
                               atol=1e-4, rtol=0)
    assert small.pager.stats.misses > small.pager.capacity
    # the same model split into shards, opened from the first shard
    first = G.write_tiny_gguf(tmp_path / "split.gguf", "F32", split_max_tensors=12)
    assert first.name == "split-00001-of-00003.gguf"
    torch.testing.assert_close(Engine(first).forward(IDS), ref, atol=1e-4, rtol=0)
    with pytest.raises(StoreError, match="open the first shard"):
        Engine(first.with_name("split-00002-of-00003.gguf"))


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_gguf_equals_its_converted_store_and_reads_the_same_records(tiny, tmp_path, kind):
    from flashmoe_plugin.convert import convert
    dst = convert(tiny[kind], tmp_path / "store", quant="keep")
    a, b = Engine(tiny[kind], ram_budget=4 * 8192), Engine(dst, ram_budget=4 * 8192)
    assert a.store.layout_of(0).part("w13").format == kind.lower() == b.store.quant
    assert a.model.numerics is not None and b.model.numerics is None
    a.model.numerics = None  # llama.cpp's float order for the router/RoPE/attention is a GGUF's alone
    torch.testing.assert_close(a.forward(IDS), b.forward(IDS), atol=0, rtol=0)
    sa, sb = a.pager.stats, b.pager.stats
    assert sa.misses == sb.misses > 0
    # the GGUF run reads each record's extents, the store its padded record
    assert sa.bytes_read == sa.misses * a.store.record_bytes
    assert sb.bytes_read == sb.misses * b.store.layout.size
    assert b.store.layout.size - a.store.record_bytes < 4096
    # the store's tokenizer came from the GGUF vocabulary
    assert b.tokenizer.encode("hello the") == a.tokenizer.encode("hello the") == [104, 101, 108, 108, 111, 257, 104, 101]


def test_sidecar_index_catches_a_damaged_expert(tiny, tmp_path):
    import shutil
    path = tmp_path / "m.gguf"
    shutil.copy(tiny["Q8_0"], path)
    s = GgufStore.open(path)
    with pytest.raises(StoreError, match="run `flashmoe inspect --index "):
        s.verify()
    idx = s.write_index()
    assert idx.parent == s.path and idx.is_file()
    assert GgufStore.open(path).verify() == []
    f, off, n, _, _ = s.record_reads(1, 2)[2]  # layer 1, expert 2, its down projection
    with open(f, "r+b") as fh:
        fh.seek(off + n // 2)
        b = fh.read(1)
        fh.seek(off + n // 2)
        fh.write(bytes([b[0] ^ 0xFF]))
    assert GgufStore.open(path).verify() == [f"{path}: layer 1 expert 2: checksum mismatch"]
    eng = Engine(path, ram_budget=None)
    with pytest.raises(StoreError, match="layer 1 expert 2: checksum mismatch"):
        for t in range(3, 300):  # until routing reaches the damaged expert
            eng.forward([t])


def _corrupt(src, dst, edit):
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))
    return dst


def test_bad_files_are_clear_errors_and_write_nothing(tiny, tmp_path):
    import gguf
    src = tiny["F32"]
    r = gguf.GGUFReader(str(src))
    last = max(r.tensors, key=lambda t: t.data_offset)
    cache = tmp_path / "cache"
    trunc = _corrupt(src, tmp_path / "trunc.gguf", lambda d: d.__delitem__(slice(len(d) - 1000, None)))
    with pytest.raises(StoreError, match=f"tensor {last.name}: data .* outside the file"):
        Engine(trunc)
    # forge the tensor-info offset of blk.0.ffn_down_exps.weight far past the end
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_down_exps.weight")
    at = int(t.field.offset + sum(p.nbytes for p in t.field.parts[:-1]))
    forged = _corrupt(src, tmp_path / "forged.gguf",
                      lambda d: d.__setitem__(slice(at, at + 8), (1 << 40).to_bytes(8, "little")))
    with pytest.raises(StoreError, match="tensor blk.0.ffn_down_exps.weight: data"):
        GgufStore.open(forged)
    # gate and up of different types (a record's w13 is one part)
    q2 = G.write_tiny_gguf(tmp_path / "q2.gguf", "F32")
    r2 = gguf.GGUFReader(str(q2), "r+")
    t2 = next(t for t in r2.tensors if t.name == "blk.1.ffn_up_exps.weight")
    t2.field.parts[4][0] = gguf.GGMLQuantizationType.Q4_0  # same shape, another type: still well-formed
    del r2
    with pytest.raises(StoreError, match="layer 1: ffn_gate_exps and ffn_up_exps differ"):
        GgufStore.open(q2)
    arch = G.write_tiny_gguf(tmp_path / "arch.gguf", "F32", arch="gpt2")
    with pytest.raises(StoreError, match="general.architecture 'gpt2' is not supported"):
        GgufStore.open(arch)
    with pytest.raises(StoreError, match="not a readable GGUF"):
        GgufStore.open(_corrupt(src, tmp_path / "junk.gguf", lambda d: d.__setitem__(slice(4, 8), b"\xff" * 4)))
    assert not cache.exists()  # nothing written for any of them


def test_unsupported_expert_type_names_tensor_and_type(tmp_path):
    import gguf
    p = G.write_tiny_gguf(tmp_path / "iq.gguf", "F32")
    r = gguf.GGUFReader(str(p), "r+")
    for t in r.tensors:
        if t.name == "blk.0.ffn_down_exps.weight":  # a type of the same size (4 bytes an element)
            t.field.parts[4][0] = gguf.GGMLQuantizationType.I32
    del r
    with pytest.raises(StoreError, match="tensor blk.0.ffn_down_exps.weight: type I32 is not supported for experts"):
        GgufStore.open(p)


def test_llama_drop_in_opens_a_gguf_with_llama_cpp_keywords(tiny):
    from flashmoe_plugin import Llama
    llm = Llama(model_path=str(tiny["Q4_0"]), n_gpu_layers=-1, n_ctx=128, n_batch=64, n_threads=1, use_mmap=True,
                use_mlock=False, flash_attn=False, type_k=0, type_v=0, offload_kqv=True, main_gpu=0,
                tensor_split=None, rope_freq_base=0.0, verbose=False, seed=1)
    out = llm("hello", max_tokens=4, temperature=0)
    assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] == 4
    assert llm.tokenize(b"hello the", add_bos=False) == [104, 101, 108, 108, 111, 257, 104, 101]
    assert llm.n_vocab() == 300 and llm.token_eos() == 256
    # the chat template comes from tokenizer.chat_template
    assert "<|endoftext|>{{ m['content'] }}" in llm._engine.tokenizer.chat_template
    chat = llm.create_chat_completion(messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)
    assert chat["object"] == "chat.completion" and chat["usage"]["prompt_tokens"] == 3  # <|endoftext|> h i


def test_cli_inspect_index_run_convert(tiny, tmp_path):
    env = {**os.environ, "FLASHMOE_CACHE": str(tmp_path / "cache")}

    def cli(*args):
        return subprocess.run([sys.executable, "-c", "from flashmoe_plugin.cli import main; main()", *map(str, args)],
                              capture_output=True, text=True, env=env, timeout=300)
    r = cli("inspect", tiny["Q8_0"], "--index", "--verify", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "qwen3_moe" and info["verify"]["ok"] and info["quant"]["format"] == "q8_0"
    r = cli("run", tiny["Q8_0"], "-p", "hello", "-n", "4", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hello")
    r = cli("convert", tiny["Q4_0"], tmp_path / "st", "--quant", "q8")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "st" / "manifest.json").read_text())["quant"]["format"] == "q8"
    r = cli("run", tmp_path / "missing.gguf", "-p", "x")
    assert r.returncode != 0
