"""The dense part held packed (runtime/dense_quant.py, kernels/packed.py): q8/q4 quantized at load,
or a GGUF's own blocks kept as they are, computed by Backend.linear.

Oracles: the reference dequantization (quant.dequantize; gguf-py for llama.cpp's blocks) followed
by torch's F.linear / F.embedding: a packed product must equal the product with the dequantized
matrix, and a whole engine with packed dense weights the same engine given those dequantized
matrices as floats, in every family (hybrid ones included), prefill and decode, with the graph
decode's CPU twin too; on a GGUF quantized by llama.cpp, `keep` (the default there) must be as
close to llama.cpp as the dequantized floats are, in a fraction of the RAM."""
import pytest
import torch
import torch.nn.functional as F
from conftest import run_sequence

from flashmoe_plugin import kernels, quant
from flashmoe_plugin.kernels.packed import PackedStack, PackedWeight
from flashmoe_plugin.runtime.dense_quant import dense_bytes
from flashmoe_plugin.runtime.engine import Engine


def _backends():
    out = ["torch"]
    if kernels.all_backends()["cpu"].available()[0]:
        out.append("cpu")
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("fmt", ["q8", "q4", "bf16", "q8_0", "q4_0", "q4_k", "q6_k"])
def test_packed_linear_and_rows_equal_the_dequantized_reference(backend, fmt, monkeypatch):
    be = kernels.select("cpu", backend)
    monkeypatch.setattr(be, "gguf_act", "f32", raising=False)  # fp32 activations: the float reference
    rows, cols = 96, 512
    g = torch.Generator().manual_seed(0)
    if fmt in quant.FORMATS:
        part = quant.quantize(torch.randn(rows, cols, generator=g) * 0.05, fmt)
    else:
        import gguf_oracles as G
        pytest.importorskip("gguf")
        part = G.random_part(fmt, rows, cols, seed=1)
    w = PackedWeight(part, fmt, (rows, cols), be, torch.float32)
    ref = quant.dequantize(part, fmt, (rows, cols))
    for T in (1, 5):
        x = torch.randn(T, cols, generator=g)
        want = F.linear(x, ref)
        torch.testing.assert_close(w.linear(x), want, atol=1e-4 * want.abs().max().item(), rtol=0)
    bias = torch.randn(rows, generator=g)
    torch.testing.assert_close(w.linear(x, bias), F.linear(x, ref, bias), atol=1e-4 * want.abs().max().item(), rtol=0)
    ids = torch.tensor([[3, 0, 95], [3, 7, 50]])
    assert torch.equal(w.rows(ids), F.embedding(ids, ref))  # dequantization is exact in both backends
    assert torch.equal(w.dequantize(), ref)


def _dequantized_twin(store, packed: Engine, **kw) -> Engine:
    """An engine whose dense matrices are the packed engine's, dequantized to floats."""
    ref = Engine(store, dense_quant="none", prefetch="off", **kw)
    m = ref.model
    for name, w in packed.model.w.items():
        if isinstance(w, PackedWeight):
            m.w[name] = w.dequantize(torch.float32)
    if hasattr(m, "lm_head"):
        m.lm_head = m.w["embed.weight"] if m.cfg.tie_word_embeddings else m.w["lm_head.weight"]
    return ref


def _ids(seed=5, n=14, m=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 384, (n,), generator=g).tolist(), torch.randint(3, 384, (m,), generator=g).tolist()


@pytest.mark.parametrize("mode", ["q8", "q4"])
def test_every_family_computes_its_packed_dense_part_exactly(oracles, family, mode):
    store = oracles(family).store("none")
    eng = Engine(store, dense_quant=mode, prefetch="off", decode_graph="off")
    packed = [n for n, w in eng.model.w.items() if isinstance(w, PackedWeight)]
    assert any(n.endswith("attn.o.weight") or n.endswith("out_proj.weight") for n in packed), packed
    assert "embed.weight" in packed and not any("router" in n or "norm" in n for n in packed)
    ref = _dequantized_twin(store, eng, decode_graph="off")
    ids, steps = _ids()
    got, want = run_sequence(eng, ids, steps), run_sequence(ref, ids, steps)
    assert (got - want).abs().max() < 1e-4 * max(1.0, want.abs().max().item())
    assert dense_bytes(eng.model.w) < dense_bytes(ref.model.w)
    eng.close()
    ref.close()


def test_hybrid_families_too(oracles, hybrid_family):
    store = oracles(hybrid_family).store("none")
    eng = Engine(store, dense_quant="q8", prefetch="off")
    assert any(n.endswith("linear.out_proj.weight") for n, w in eng.model.w.items() if isinstance(w, PackedWeight))
    ref = _dequantized_twin(store, eng)
    ids, steps = _ids(n=10, m=4)
    got, want = run_sequence(eng, ids, steps), run_sequence(ref, ids, steps)
    assert (got - want).abs().max() < 1e-4 * max(1.0, want.abs().max().item())


def test_graph_decode_cpu_twin_with_packed_dense(oracles):
    """The device step takes q, k and v as one stack of packed parts; it must equal the eager
    step bit for bit and the ordinary path within the float tolerance, with misses."""
    store = oracles("mixtral").store("q4")
    ids, steps = _ids(seed=9)
    probe = Engine(store, prefetch="off")
    size, k = probe.pager.record_size, probe.config.top_k
    probe.close()
    runs = {}
    for mode in ("off", "on", "eager"):
        eng = Engine(store, prefetch="off", dense_quant="q8", decode_graph=mode, ram_budget=2 * k * size)
        if mode == "on":
            assert isinstance(eng.fast.args[0]["wqkv"], PackedStack)
        runs[mode] = run_sequence(eng, ids, steps)
        eng.close()
    assert torch.equal(runs["on"], runs["eager"])
    assert (runs["on"] - runs["off"]).abs().max() < 1e-4


def test_default_is_exact_floats_and_bad_values_are_named():
    eng = Engine("demo")
    assert eng.dense_quant == "none"
    assert all(isinstance(w, torch.Tensor) for w in eng.model.w.values())
    with pytest.raises(ValueError, match="dense_quant must be one of auto, none, q8, q4, keep, not 'q3'"):
        Engine("demo", dense_quant="q3")


def test_auto_on_a_gpu_packs_q8_only_for_quantized_experts_and_16_bit_activations(oracles):
    """resolve() is the policy alone (no GPU needed): q8 where the user already runs quantized
    experts with bf16/fp16 activations; exact floats for float stores and fp32 (oracle) runs."""
    from flashmoe_plugin.runtime.dense_quant import resolve
    from flashmoe_plugin.store.model import open_model
    q4, none = (open_model(oracles("mixtral").store(q)) for q in ("q4", "none"))
    assert resolve("auto", q4, "cuda", dtype=torch.bfloat16) == "q8"
    assert resolve("auto", q4, "cuda", dtype=torch.float16) == "q8"
    assert resolve("auto", q4, "cuda", dtype=torch.float32) == "none"
    assert resolve("auto", none, "cuda", dtype=torch.bfloat16) == "none"
    assert resolve("auto", q4, "cpu", dtype=torch.bfloat16) == "none"
    assert resolve("q4", q4, "cuda", dtype=torch.float32) == "q4"


def test_keep_on_a_float_store_holds_its_stored_dtype():
    eng = Engine("demo", dense_quant="keep", prefetch="off")
    fmts = {w.fmt for w in eng.model.w.values() if isinstance(w, PackedWeight)}
    stored = {quant.DTYPE_FORMATS[t.dtype] for t in eng.store.load_dense().values()}
    assert fmts and fmts <= stored
    ref = Engine("demo", dense_quant="none", prefetch="off")
    ids, steps = _ids()
    assert (run_sequence(eng, ids, steps) - run_sequence(ref, ids, steps)).abs().max() < 1e-4


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    import gguf_oracles as G
    root = tmp_path_factory.mktemp("dq")
    f32 = G.write_tiny_gguf(root / "tiny-f32.gguf", "Q8_0")
    return G, f32, G.quantize(f32, "q8_0")  # llama.cpp's quantizer: the dense matrices in Q8_0 too


def test_a_quantized_gguf_keeps_its_blocks_by_default(tiny_q8, monkeypatch, tmp_path):
    G, f32, path = tiny_q8
    monkeypatch.setenv("FLASHMOE_CACHE", str(tmp_path / "cache"))
    keep, none = Engine(path, prefetch="off"), Engine(path, dense_quant="none", prefetch="off")
    assert keep.dense_quant == "keep" and Engine(f32, prefetch="off").dense_quant == "none"
    fmts = {w.fmt for w in keep.model.w.values() if isinstance(w, PackedWeight)}
    assert fmts and fmts <= {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"}, fmts
    assert dense_bytes(keep.model.w) < 0.4 * dense_bytes(none.model.w)
    ids = list(range(3, 60))
    a, b = keep.forward(ids), none.forward(ids)  # the CPU default: llama.cpp's quantized activations
    ref, _ = G.llama_cpp_logits(path, ids)
    assert (a - ref).abs().mean() <= 1.01 * (b - ref).abs().mean() + 1e-6
    monkeypatch.setattr(keep.backend, "gguf_act", "f32")  # fp32 activations: same blocks, summation order
    a, b = Engine(path, prefetch="off").forward(ids), Engine(path, dense_quant="none", prefetch="off").forward(ids)
    assert (a - b).abs().max() < 1e-4 * max(1.0, b.abs().max().item())


def test_cli_and_llama_take_the_option():
    import subprocess
    import sys

    from flashmoe_plugin import Llama

    def cli(*args):
        return subprocess.run([sys.executable, "-c", "from flashmoe_plugin.cli import main; main()", *args],
                              capture_output=True, text=True, timeout=300)
    r = cli("run", "demo", "-p", "Once", "-n", "3", "--temp", "0", "--dense-quant", "q8")
    assert r.returncode == 0, r.stderr
    r = cli("bench", "demo", "--dense-quant", "q5")
    assert r.returncode == 2 and "'q5' is not one of" in r.stderr, r.stderr
    llm = Llama(model_path="demo", dense_quant="q4", verbose=False)
    assert llm._engine.dense_quant == "q4"
    assert llm("Once", max_tokens=2, temperature=0)["choices"][0]["finish_reason"] in ("length", "stop")
