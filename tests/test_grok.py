"""Grok-1 against llama.cpp: a small random checkpoint in Grok-1's original tensor layout, turned
into an F32 GGUF by llama.cpp's own converter and run by llama_cpp.Llama (F32 KV cache), against
our engine on a store converted from the same checkpoint."""
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from gguf_oracles import hf_tokenizer, llama_cpp_logits, llama_cpp_source
from safetensors.torch import save_file

from flashmoe_plugin.convert import convert
from flashmoe_plugin.convert.synth import write_tokenizer
from flashmoe_plugin.runtime.engine import Engine

H, I, HEADS, KV, LAYERS, E, VOCAB = 128, 128, 4, 2, 2, 4, 32000
CONFIG = {"architectures": ["Grok1ForCausalLM"], "model_type": "grok-1", "vocab_size": VOCAB, "hidden_size": H,
          "intermediate_size": I, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
          "num_key_value_heads": KV, "head_dim": H // HEADS, "num_local_experts": E, "num_experts_per_tok": 2,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
          "embedding_multiplier_scale": 78.38367176906169, "output_multiplier_scale": 0.5773502691896257,
          "attn_output_multiplier": 0.08838834764831845, "attn_logit_softcapping": 30.0,
          "bos_token_id": 1, "eos_token_id": 2}


def grok_checkpoint(out, seed=0):
    """Random weights under Grok-1's names; embeddings small (they are scaled by 78), routers
    decisive, norms away from 1 so that all four norms of a layer matter."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.04):
        return torch.randn(*shape, generator=g) * std
    t = {"transformer.in_out_embed.weight": rnd(VOCAB, H, std=0.004),
         "transformer.rms_norm.weight": 1 + rnd(H, std=0.1)}
    hd = H // HEADS
    for i in range(LAYERS):
        p = f"transformer.decoder_layer.{i}."
        t.update({p + "multi_head_attention.query.weight": rnd(HEADS * hd, H),
                  p + "multi_head_attention.key.weight": rnd(KV * hd, H),
                  p + "multi_head_attention.value.weight": rnd(KV * hd, H),
                  p + "multi_head_attention.linear.weight": rnd(H, HEADS * hd),
                  p + "router.weight": rnd(E, H, std=0.4)})
        for n in ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3"):
            t[p + n + ".weight"] = 1 + rnd(H, std=0.1)
        for e in range(E):
            t.update({p + f"moe.{e}.linear.weight": rnd(I, H), p + f"moe.{e}.linear_v.weight": rnd(I, H),
                      p + f"moe.{e}.linear_1.weight": rnd(H, I)})
    out.mkdir(parents=True)
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(CONFIG))


@pytest.fixture(scope="module")
def grok(tmp_path_factory):
    root = tmp_path_factory.mktemp("grok")
    try:
        src, spm = llama_cpp_source(), hf_tokenizer("llama-spm")
    except OSError as e:
        pytest.skip(f"llama.cpp's converter (llama-cpp-python sdist) not reachable: {e}")
    hf = root / "hf"
    grok_checkpoint(hf)
    ours = root / "tok"
    ours.mkdir()
    write_tokenizer(ours, SimpleNamespace(max_position_embeddings=512))
    shutil.copy(ours / "tokenizer.json", hf)  # ours needs one; ids, not text, are compared here
    for f in spm.iterdir():  # llama.cpp's converter reads the SentencePiece model
        shutil.copy(f, hf / f.name)
    gguf = root / "grok-f32.gguf"
    r = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf), "--outfile", str(gguf),
                        "--outtype", "f32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return hf, gguf, convert(hf, root / "store", quant="none")


def ggml_geglu(h):
    """llama.cpp's CPU GeGLU: gelu read from a table indexed by the f16 input, stored in f16."""
    g, u = h.chunk(2, dim=-1)
    table = torch.nn.functional.gelu(g.half().float(), approximate="tanh").half().float()
    return torch.where(g <= -10, 0.0, torch.where(g >= 10, g, table)) * u


def test_grok_matches_llama_cpp(grok):
    hf, gguf, store = grok
    ids = torch.randint(3, VOCAB, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    ref, llm = llama_cpp_logits(gguf, ids)
    eng = Engine(store)
    exact = eng.forward(ids)
    # With llama.cpp's f16 GELU table in place of our f32 GELU, every other step of the graph
    # (scaled embeddings, capped scores, four norms, routing, scaled logits) agrees to 1e-4,
    # in prefill and token by token through the cache.
    eng.model.expert_act = ggml_geglu
    eng.reset()
    torch.testing.assert_close(eng.forward(ids), ref, atol=1e-4, rtol=0)
    eng.reset()
    steps = torch.cat([eng.forward(ids[i:i + 1]) for i in range(len(ids))])
    torch.testing.assert_close(steps, ref, atol=1e-4, rtol=0)
    # Our own GELU is exact (f32, tanh form, as Grok-1's JAX code): llama.cpp's table differs by
    # f16 rounding only, ~1e-4 on logits of magnitude ~0.1 here.
    torch.testing.assert_close(exact, ref, atol=1e-3, rtol=0)
    eng.close()


def test_grok_greedy_matches_llama_cpp_at_a_quarter_budget(grok):
    from flashmoe_plugin.runtime.generate import tokens
    from flashmoe_plugin.runtime.sampling import Sampler, SamplingParams
    hf, gguf, store = grok
    prompt = torch.randint(3, VOCAB, (8,), generator=torch.Generator().manual_seed(2)).tolist()
    _, llm = llama_cpp_logits(gguf, prompt)
    ref = []
    for t in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        ref.append(t)
        if len(ref) == 32:
            break
    full = Engine(store)
    eng = Engine(store, ram_budget=int(full.store.expert_bytes * 0.25))
    full.close()
    eng.model.expert_act = ggml_geglu
    stream = tokens(eng, prompt, Sampler(SamplingParams(temperature=0)))
    ours = [next(stream) for _ in range(32)]
    assert eng.pager.stats.evictions > 0
    eng.close()
    assert ours == ref
