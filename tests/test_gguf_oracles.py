"""Our engine on GGUF files against llama.cpp (llama-cpp-python) on the same files: F32 logits
within 1e-4 and identical greedy tokens for every family; llama.cpp's own Q8_0 / Q4_0 / Q4_K_M
quantizations: the same logits bit for bit, in a batch and token by token.

llama.cpp quantizes the activations to the weight type's Q8_0 / Q8_1 / Q8_K blocks inside its
quantized matmuls; our CPU kernels do the same by default (gguf_act "q8", test_gguf_q8.py holds
them to libggml-cpu). An 8-bit rounding turns a last-bit difference anywhere in the residual
stream into a step of one quant now and then, and where that reaches a key or value attention
carries it to every later position; so every op of a quantized GGUF's forward on the CPU follows
llama.cpp's float order (issue 11): the RMSNorms, the quantized products in the kernel llama.cpp
picks for the shape (Q8_0 / Q4_0 repacked, Q4_K repacked GEMM/GEMV, Q5_K / Q6_K tiled or vec_dot),
and the float parts (kernels/ggml_numerics.py: the router's F32 matmul and softmax, RoPE, the
attention's K.Q, softmax and P.V). Each is checked against llama.cpp's own graph nodes (read
through cb_eval), and the whole run against its logits. The orders are those of llama.cpp's
x86 build for AVX-512 CPUs (this machine's); elsewhere llama.cpp picks other kernels, and the
tests hold the agreement to 99% instead of bit-exactness (benchmarks/gguf_agreement.py measures
it over several sequences)."""
import os

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

import gguf_oracles as G  # noqa: E402
from llama_nodes import llama_cpp_nodes  # noqa: E402

from flashmoe_plugin.models import gguf as names  # noqa: E402
from flashmoe_plugin.models.layers import linear, rms_norm  # noqa: E402
from flashmoe_plugin.runtime.engine import Engine  # noqa: E402

ATOL = 1e-4
# llama.cpp picks its CPU kernels by the CPU it is built for; our orders follow its x86 AVX-512 build
AVX512 = "avx512f" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else False


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
    read in place. By default MXFP4 products take Q8_0 activations as llama.cpp's do (its
    vec_dot_type): we match llama.cpp on that file to 1e-4 (measured 1.2e-6; fp32 activations
    are 2.2e-2 away). With fp32 activations our MXFP4 dequantization is exact, so we match
    llama.cpp on the F32 file of the same values to 1e-4 (measured 1.1e-6)."""
    _, f32 = gguf_models("gpt_oss")
    path = G.mxfp4_gguf(f32.parent)
    eng = Engine(path)
    assert {p.format for p in eng.store.layout.parts} == {"mxfp4", "f32"}  # b13/b2 biases stay f32
    ids = ids_for(48, eng.config.vocab_size, seed=4)
    ref, _ = G.llama_cpp_logits(path, ids)
    assert eng.backend.gguf_act == "q8"
    ours = eng.forward(ids)
    eng.backend.gguf_act = "f32"  # one backend instance serves every engine: set back below
    try:
        exact = Engine(path)
        fp32 = exact.forward(ids)
        exact.close()
    finally:
        eng.backend.gguf_act = "q8"
    full, _ = G.llama_cpp_logits(f32, ids)
    torch.testing.assert_close(fp32, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert (fp32 - ref).abs().max().item() > 10 * ATOL  # the two modes really differ on this file
    eng.close()


def test_norms_equal_llama_cpp_bit_for_bit(gguf_models):
    """Every RMSNorm of a Q4_0 run, fed llama.cpp's own input (its graph nodes, read through
    cb_eval), gives llama.cpp's output bit for bit. llama.cpp rounds these outputs to 8 bits for
    the next matmul: torch's fp32 norm was one ulp off in ~10% of rows, enough to flip a quant
    of a key/value and, through attention, move every later position (Q4_0: 94.5% -> 95.7%)."""
    _, f32 = gguf_models("mixtral")
    path = G.quantize(f32, "q4_0")
    eng = Engine(path, backend="cpu")
    w, c = eng.model.w, eng.config
    ids = ids_for(64, c.vocab_size, seed=3)
    nodes, _ = llama_cpp_nodes(path, ids, want=("embd", "attn_norm-", "ffn_inp-", "ffn_norm-", "l_out-",
                                                "result_norm"))
    t = {k: torch.from_numpy(v[0]) for k, v in nodes.items()}
    pairs = [("embd", "attn_norm-0", "layers.0.attn_norm.weight"), (f"l_out-{c.num_layers - 1}", "result_norm",
                                                                       "norm.weight")]
    for i in range(c.num_layers):
        pairs.append((f"ffn_inp-{i}", f"ffn_norm-{i}", f"layers.{i}.ffn_norm.weight"))
        if i:
            pairs.append((f"l_out-{i - 1}", f"attn_norm-{i}", f"layers.{i}.attn_norm.weight"))
    for src, dst, norm_w in pairs:
        ours = rms_norm(t[src], w[norm_w], c.rms_norm_eps)
        off = (ours != t[dst]).any(-1).sum().item()
        assert off == 0, f"{dst}: {off} of {len(ids)} rows differ from llama.cpp's"
    eng.close()


def test_q8_0_and_q4_0_products_equal_llama_cpp_bit_for_bit(gguf_models):
    """Fed llama.cpp's inputs, our attn_v (Q8_0) and attn_output (Q4_0) products of a 256-token
    batch equal llama.cpp's nodes bit for bit: the 8-bit activations are ggml's and the float
    combination follows its kernels (Q8_0: vec_dot / llamafile's 8 lanes of 4; Q4_0: the
    repacked 8x8 GEMM's one fused multiply-add a block). Those are the kernels llama.cpp picks
    on an AVX2 CPU; elsewhere it picks others."""
    from flashmoe_plugin import _gguf_kernels
    if _gguf_kernels.q8_isa() == "portable":
        pytest.skip("no AVX2 here: llama.cpp computes these with other kernels on this CPU")
    _, f32 = gguf_models("mixtral")
    path = G.quantize(f32, "q4_0")
    eng = Engine(path, backend="cpu")
    G.dense_in_blocks(eng)
    w, c = eng.model.w, eng.config
    ids = ids_for(256, c.vocab_size, seed=3)
    nodes, _ = llama_cpp_nodes(path, ids, want=("attn_norm-", "Vcur-", "kqv_out-", "attn_out-"))
    t = {k: torch.from_numpy(v[0]) for k, v in nodes.items()}
    for i in range(c.num_layers):
        for src, dst, name in ((f"attn_norm-{i}", f"Vcur-{i}", "v"), (f"kqv_out-{i}", f"attn_out-{i}", "o")):
            ours = linear(t[src], w[f"layers.{i}.attn.{name}.weight"])
            off = (ours != t[dst]).any(-1).sum().item()
            assert off == 0, f"{dst}: {off} of {len(ids)} rows differ from llama.cpp's"
    eng.close()


def test_float_ops_and_k_quant_products_equal_llama_cpp_bit_for_bit(gguf_models):
    """Fed llama.cpp's own inputs, each op of a Q4_K_M run equals llama.cpp's graph node bit for
    bit, in a batch of 256 tokens and of 6 (other kernels: GEMV rows, vec_dot): the router's F32
    matmul and softmax, RoPE, the attention (q/k in our half-split order, summed in llama.cpp's
    permuted one) and the K-quant products Q4_K (attn_q), Q5_K (attn_output), Q6_K (output)."""
    if not AVX512:
        pytest.skip("no AVX-512: llama.cpp's build here has other float orders than the ones we follow")
    _, f32 = gguf_models("mixtral")
    path = G.quantize(f32, "q4_k_m")
    eng = Engine(path, backend="cpu")
    G.dense_in_blocks(eng)
    w, c, dec = eng.model.w, eng.config, eng.model
    g = dec.numerics
    assert g is not None and g.interleaved
    hd, H, Hkv = c.head_dim, c.num_heads, c.num_kv_heads
    perm = {n: names.fix_dense(f"layers.0.attn.{n}.weight", torch.arange(heads * hd), c, eng.store.arch_key)
            for n, heads in (("q", H), ("k", Hkv))}

    def ours_order(x, n):  # llama.cpp's permuted q/k columns -> ours
        return x.reshape(x.shape[0], -1)[:, perm[n]]
    for T in (256, 6):
        ids = ids_for(T, c.vocab_size, seed=5)
        nodes, _ = llama_cpp_nodes(path, ids, want=("attn_norm-", "Qcur-", "Kcur-", "Vcur-", "kqv_out-", "attn_out-",
                                                    "ffn_norm-", "ffn_moe_logits-", "ffn_moe_probs-", "result_"))
        t = {k: [torch.from_numpy(a) for a in v] for k, v in nodes.items()}
        cos, sin = dec.positions(0, T, torch.float32, "cpu")[:2]
        for i in range(c.num_layers):
            p = f"layers.{i}."
            got = {"router": g.matmul(t[f"ffn_norm-{i}"][0], w[p + "moe.router.weight"]),
                   "softmax": g.softmax(t[f"ffn_moe_logits-{i}"][0]),
                   "rope": g.rope(ours_order(t[f"Kcur-{i}"][0], "k").view(T, Hkv, hd), cos, sin),
                   "attention": g.attention(ours_order(t[f"Qcur-{i}"][-1], "q").view(T, H, hd),
                                            ours_order(t[f"Kcur-{i}"][-1], "k").view(T, Hkv, hd),
                                            t[f"Vcur-{i}"][0].reshape(T, Hkv, hd), 0, g.scale(hd)),
                   "attn_q Q4_K": linear(t[f"attn_norm-{i}"][0], w[p + "attn.q.weight"]),
                   "attn_output Q5_K": linear(t[f"kqv_out-{i}"][0], w[p + "attn.o.weight"])}
            want = {"router": t[f"ffn_moe_logits-{i}"][0], "softmax": t[f"ffn_moe_probs-{i}"][0],
                    "rope": ours_order(t[f"Kcur-{i}"][-1], "k"), "attention": t[f"kqv_out-{i}"][0],
                    "attn_q Q4_K": ours_order(t[f"Qcur-{i}"][0], "q"), "attn_output Q5_K": t[f"attn_out-{i}"][0]}
            for k in got:
                off = (got[k].reshape(T, -1) != want[k].reshape(T, -1)).any(-1).sum().item()
                assert off == 0, f"T={T}, layer {i}, {k}: {off} of {T} rows differ from llama.cpp's"
        head = linear(t["result_norm"][0], eng.model.lm_head)
        assert torch.equal(head, t["result_output"][0]), f"T={T}: output (Q6_K) differs from llama.cpp's"
    eng.close()


# the acceptance floor where llama.cpp's kernels are not the ones we follow (measured here before
# issue 11's float orders: 0.969-0.988 over 256 positions)
AGREE = 0.99
# mean |diff| to llama.cpp, q8 activations over fp32 ones, there
CLOSER = {"q8_0": 0.5, "q4_k_m": 0.5, "q4_0": 0.75}


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_k_m"])
def test_quantized_files_agree_with_llama_cpp(gguf_models, kind):
    """Mixtral (llama arch: q/k un-permuted) quantized by llama.cpp, its dense matrices computed
    from their blocks like the experts (G.dense_in_blocks): 256 positions in one batch, then 24
    tokens one at a time (llama.cpp's decode kernels: GEMV, vec_dot) against llama.cpp's own token
    by token run. On an AVX-512 CPU both equal llama.cpp's logits bit for bit (before issue 11's
    float orders: 98.8% / 96.9% / 98.4% argmax agreement, mean |diff| 3e-3 to 7e-3); elsewhere
    the agreement is held to 99% and the logits to be closer to llama.cpp's than with fp32
    activations."""
    _, f32 = gguf_models("mixtral")
    path = G.quantize(f32, kind)
    eng = Engine(path, backend="cpu")
    types = {p.format for lay in eng.store.layer_layouts.values() for p in lay.parts}
    assert types and not types & {"f32", "f16", "bf16"}, types  # the experts really are quantized
    assert G.dense_in_blocks(eng) > 0
    ids = ids_for(256, eng.config.vocab_size, seed=3)
    ref, llm = G.llama_cpp_logits(path, ids)
    assert eng.backend.gguf_act == "q8"
    ours = eng.forward(ids)
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= AGREE, f"{kind}: argmax agreement {agree:.3f}"
    llm.reset()
    for tok in ids[:24]:
        llm.eval([tok])
    steps_ref = torch.from_numpy(np.array(llm.scores[:24], dtype=np.float32))
    eng.reset()
    steps = torch.cat([eng.forward([tok]) for tok in ids[:24]])
    if AVX512:
        assert torch.equal(ours, ref), f"{kind}: batch logits differ, max {(ours - ref).abs().max().item():.2e}"
        assert torch.equal(steps, steps_ref), f"{kind}: decode logits differ, max {(steps - steps_ref).abs().max().item():.2e}"
        return
    assert (steps.argmax(-1) == steps_ref.argmax(-1)).float().mean().item() >= AGREE
    ours_err = (ours - ref).abs().mean().item()
    eng.backend.gguf_act = "f32"  # one backend instance serves every engine: set back below
    try:
        other = Engine(path, backend="cpu")
        G.dense_in_blocks(other)
        fp32_err = (other.forward(ids) - ref).abs().mean().item()
    finally:
        eng.backend.gguf_act = "q8"
    assert ours_err < fp32_err * CLOSER[kind], (ours_err, fp32_err)
