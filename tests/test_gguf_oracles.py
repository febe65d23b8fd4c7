"""Our engine on GGUF files against llama.cpp (llama-cpp-python) on the same files: F32 logits
within 1e-4 and identical greedy tokens for every family; llama.cpp's own Q8_0 / Q4_0 / Q4_K_M
quantizations: argmax agreement over 256 positions.

llama.cpp quantizes the activations to the weight type's Q8_0 / Q8_1 / Q8_K blocks inside its
quantized matmuls; our CPU kernels do the same by default (gguf_act "q8", test_gguf_q8.py holds
them to libggml-cpu). What is left between us is float rounding (summation order, torch's
norms, softmax and RoPE against ggml's), and an 8-bit rounding amplifies a last-bit difference
into a step of one quant now and then; on these random models that moves near-tie argmaxes."""
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

import gguf_oracles as G  # noqa: E402

from flashmoe_plugin.runtime.engine import Engine  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="session")
def gguf_models(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            try:
                G.llama_cpp_source()
            except OSError as e:
                pytest.skip(f"llama-cpp-python sdist (llama.cpp's converter) not reachable: {e}")
            cache[family] = G.make_gguf_model(family, tmp_path_factory.mktemp(f"gguf-{family}"))
        return cache[family]
    return get


def ids_for(n, vocab, seed=1):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", sorted(G.VOCAB))  # the families models/gguf.py reads
def test_f32_logits_and_greedy_match_llama_cpp(gguf_models, family):
    _, path = gguf_models(family)
    eng = Engine(path)
    ids = ids_for(48, eng.config.vocab_size)
    ref, llm = G.llama_cpp_logits(path, ids)
    ours = eng.forward(ids)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    eng.reset()  # token by token through the cache (gpt-oss: across its window of 8)
    steps = torch.cat([eng.forward(ids[i:i + 1]) for i in range(len(ids))])
    torch.testing.assert_close(steps, ref, atol=ATOL, rtol=0)
    # greedy continuation: 32 tokens, identical
    want = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        want.append(tok)
        if len(want) == 32:
            break
    got, logits = [], ours[-1]
    for _ in range(32):
        got.append(int(logits.argmax()))
        logits = eng.forward(got[-1:])[-1]
    assert got == want


def test_gpt_oss_mxfp4_file(gguf_models):
    """gpt-oss as llama.cpp's converter writes the published checkpoint: experts in MXFP4 blocks,
    read in place. Our MXFP4 dequantization is exact, so on this file we match llama.cpp on the
    F32 file of the same values to 1e-4 (measured 1.1e-6). llama.cpp on the MXFP4 file itself
    rounds the activations to Q8_0 inside its MXFP4 products (measured here: max |d| 2.5e-2, argmax
    agreement 0.96): there we ask for the argmax and a bound of that rounding's size."""
    _, f32 = gguf_models("gpt_oss")
    path = G.mxfp4_gguf(f32.parent)
    eng = Engine(path)
    assert {p.format for p in eng.store.layout.parts} == {"mxfp4", "f32"}  # b13/b2 biases stay f32
    ids = ids_for(48, eng.config.vocab_size, seed=4)
    ours = eng.forward(ids)
    full, _ = G.llama_cpp_logits(f32, ids)
    torch.testing.assert_close(ours, full, atol=ATOL, rtol=0)
    ref, _ = G.llama_cpp_logits(path, ids)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9
    assert (ours - ref).abs().max().item() < 0.1
    eng.close()


# measured (devbox, 256 positions): q8_0 0.992, q4_k_m 0.984, q4_0 0.945
AGREE = {"q8_0": 0.99, "q4_k_m": 0.98, "q4_0": 0.93}


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_k_m"])
def test_quantized_files_agree_with_llama_cpp(gguf_models, kind):
    """Mixtral (llama arch: q/k un-permuted) quantized by llama.cpp, its dense matrices computed
    from their blocks like the experts (G.dense_in_blocks). With llama.cpp's quantized activations
    (the default) the logits are ~3x closer to llama.cpp's than with fp32 activations for Q8_0 and
    Q4_K_M (mean |diff| 0.0031 vs 0.0091, 0.0063 vs 0.0172) and the agreement is 99.2% / 98.4%;
    Q4_0 stays at ~94.5% either way (not explained yet: its first tokens match to 1e-7, the error
    appears at some tokens and then spreads through attention)."""
    _, f32 = gguf_models("mixtral")
    path = G.quantize(f32, kind)
    eng = Engine(path, backend="cpu")
    types = {p.format for lay in eng.store.layer_layouts.values() for p in lay.parts}
    assert types and not types & {"f32", "f16", "bf16"}, types  # the experts really are quantized
    assert G.dense_in_blocks(eng) > 0
    ids = ids_for(256, eng.config.vocab_size, seed=3)
    ref, _ = G.llama_cpp_logits(path, ids)
    full, _ = G.llama_cpp_logits(f32, ids)
    assert eng.backend.gguf_act == "q8"
    ours = eng.forward(ids)
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= AGREE[kind], f"{kind}: argmax agreement {agree:.3f}"
    ours_err, quant_err = (ours - ref).abs().mean().item(), (ref - full).abs().mean().item()
    assert ours_err < quant_err, (ours_err, quant_err)  # closer to llama.cpp than its own F32 run is
    if kind != "q4_0":
        eng.backend.gguf_act = "f32"  # one backend instance serves every engine: set back below
        try:
            other = Engine(path, backend="cpu")
            G.dense_in_blocks(other)
            fp32_err = (other.forward(ids) - ref).abs().mean().item()
        finally:
            eng.backend.gguf_act = "q8"
        assert ours_err < fp32_err / 2, (ours_err, fp32_err)
