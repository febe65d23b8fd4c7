"""Hybrid stacks (Qwen3-Next; Qwen3.5-MoE as published, a vision-language checkpoint, and text-only)
against HF transformers on the same weights: Gated DeltaNet layers with conv + recurrent state,
gated full attention with partial RoPE, a gated shared expert. On the GPU too where one is visible."""
import contextlib

import pytest
import torch
from test_oracles import assert_greedy_matches, hf_logits, prompt

from flashmoe_plugin.models.deltanet import chunked, recurrent
from flashmoe_plugin.runtime.engine import Engine

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU visible to torch (none here)")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
TOL = {"cpu": 1e-4, "cuda": 1e-3}  # fp32 both; the GPU's matmuls round differently (as in test_cuda_pager)


def engine(store, device, budget=None):
    probe = Engine(store)
    size = int(probe.store.expert_bytes * budget) if budget else None
    probe.close()
    if device == "cuda":
        return Engine(store, device="cuda", dtype=torch.float32, vram_budget=size, ram_budget=0 if size else None)
    return Engine(store, ram_budget=size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("budget", [None, 0.25], ids=["all-resident", "budget-25pct"])
def test_logits_match_transformers(oracles, hybrid_family, budget, device):
    o = oracles(hybrid_family)
    ids = prompt(80)  # the prefill crosses the DeltaNet's 64-token chunk
    ref = hf_logits(o.model, ids)
    eng = engine(o.store("none"), device, budget)
    atol = TOL[device]
    torch.testing.assert_close(eng.forward(ids), ref, atol=atol, rtol=0)
    eng.reset()
    # a short prefill, then 64 tokens one by one through the recurrent state and the KV cache
    steps = torch.cat([eng.forward(ids[:16])] + [eng.forward(ids[i:i + 1]) for i in range(16, 80)])
    torch.testing.assert_close(steps, ref, atol=atol, rtol=0)
    if budget:
        s = eng.pager.stats
        assert eng.pager.capacity < sum(l.experts for l in eng.store.layers.values())
        assert s.misses > eng.pager.capacity and s.evictions > 0
    eng.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("budget", [None, 0.25], ids=["all-resident", "budget-25pct"])
def test_greedy_generation_matches_transformers(oracles, hybrid_family, budget, device):
    o = oracles(hybrid_family)
    ids = prompt(8, seed=2)
    eng = engine(o.store("none"), device, budget)
    assert_greedy_matches(o, eng, ids)
    if budget:
        assert eng.pager.stats.misses > 0 and eng.pager.stats.evictions > 0
    eng.close()


def test_chunked_form_equals_the_recurrence():
    g = torch.Generator().manual_seed(0)
    H, T, dk, dv = 3, 150, 8, 12
    q, k = (torch.nn.functional.normalize(torch.randn(H, T, dk, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(H, T, dv, generator=g)
    decay = -torch.rand(H, T, generator=g) * 0.3
    beta = torch.rand(H, T, generator=g)
    s0 = torch.randn(H, dk, dv, generator=g)
    s1, s2 = s0.clone(), s0.clone()
    a, b = recurrent(q, k, v, decay, beta, s1), chunked(q, k, v, decay, beta, s2)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, s1, atol=1e-5, rtol=1e-5)
    assert not torch.equal(s1, s0)


def test_truncate_restores_the_recurrent_state(oracles):
    """A truncation to an earlier position goes back to the nearest snapshot (end of a prefill
    chunk) or to position 0, and replays the tokens from there."""
    o = oracles("qwen3_next")
    ids = prompt(40, seed=4)
    ref = hf_logits(o.model, ids)
    eng = Engine(o.store("none"))
    eng.forward(ids[:30])
    for i in range(30, 40):
        eng.forward(ids[i:i + 1])
    assert [p for p, *_ in eng.kv.snapshots] == [30]
    eng.truncate(35)  # snapshot at 30, replay 30..34
    assert eng.n_past == 35 and eng.kv.pos == 35
    torch.testing.assert_close(eng.forward(ids[35:]), ref[35:], atol=1e-4, rtol=0)
    eng.truncate(12)  # no snapshot at or before 12: from position 0
    torch.testing.assert_close(eng.forward(ids[12:]), ref[12:], atol=1e-4, rtol=0)
    eng.truncate(40)  # nothing to do
    assert eng.kv.pos == 40 and eng.n_past == 40
    with pytest.raises(RuntimeError, match="recurrent state is at position 40"):
        eng.model.forward(ids[:1], 20, eng.kv, eng._experts)
    eng.close()


def test_llama_save_and_load_state(oracles):
    from flashmoe_plugin import Llama
    store = str(oracles("qwen3_5_moe").store("none"))
    with Llama(model_path=store, n_ctx=128, verbose=False) as llm:
        ids = prompt(20, seed=5).tolist()
        llm.eval(ids)
        state = llm.save_state()
        a = llm.generate(ids + [5], temp=0, reset=True)
        a = [next(a) for _ in range(6)]
        llm.reset()
        llm.eval(prompt(9, seed=6).tolist())
        llm.load_state(state)
        assert llm.n_tokens == len(ids)
        b = llm.generate(ids + [5], temp=0)
        assert [next(b) for _ in range(6)] == a



def test_inspect_prints_the_cache_sizes(oracles):
    """Per layer: DeltaNet conv + recurrent state (constant), attention K/V bytes per token; the
    theory here is written from the model's definition, then checked against the real cache."""
    import json

    from click.testing import CliRunner

    from flashmoe_plugin.cli import cli
    from flashmoe_plugin.models.hybrid import HybridCache
    from flashmoe_plugin.plugins import manager
    manager().hook.register_commands(cli=cli)
    store = oracles("qwen3_next").store("none")
    hf = oracles("qwen3_next").model.config
    r = CliRunner().invoke(cli, ["inspect", str(store), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["cache_per_layer"]
    K, nk, nv, dk, dv = (hf.linear_conv_kernel_dim, hf.linear_num_key_heads, hf.linear_num_value_heads,
                         hf.linear_key_head_dim, hf.linear_value_head_dim)
    for i, t in enumerate(hf.layer_types):
        if t == "linear_attention":  # q, k, v through the conv; last K-1 inputs kept; S per value head
            want = {"conv_state_bytes": (2 * nk * dk + nv * dv) * (K - 1) * 4, "recurrent_state_bytes": nv * dk * dv * 4}
        else:
            want = {"kv_bytes_per_token": 2 * hf.num_key_value_heads * hf.head_dim * 4}
        assert rows[i] == {"layer": i, "type": t, **want}
    cache = Engine(store).kv  # what the engine allocates (fp32 on the CPU)
    assert isinstance(cache, HybridCache)
    lin = [r for r in rows if r["type"] == "linear_attention"]
    assert len(lin) == 3 and cache.conv.nbytes == sum(r["conv_state_bytes"] for r in lin)
    assert cache.rec.nbytes == sum(r["recurrent_state_bytes"] for r in lin)
    assert cache.k.nbytes + cache.v.nbytes == cache.n_ctx * sum(r.get("kv_bytes_per_token", 0) for r in rows)
    r = CliRunner().invoke(cli, ["inspect", str(store)])
    assert "3 linear attention layers" in r.output and "(constant)" in r.output, r.output


# the published config.json numbers (Qwen/Qwen3.5-397B-A17B text_config, Qwen/Qwen3-Next-80B-A3B-Instruct)
PUBLISHED = {
    "qwen3.5-397b-a17b": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(
        vocab_size=248320, hidden_size=4096, num_hidden_layers=60, num_attention_heads=32, num_key_value_heads=2,
        head_dim=256, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=1024,
        shared_expert_intermediate_size=1024, linear_num_key_heads=16, linear_num_value_heads=64,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4,
        max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25})),
    "qwen3-next-80b-a3b": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2,
        head_dim=256, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, linear_num_key_heads=16, linear_num_value_heads=32,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4,
        max_position_embeddings=262144, intermediate_size=5120,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25})),
}


@pytest.mark.parametrize("like", sorted(PUBLISHED))
def test_synth_writes_the_real_hybrid_shapes(like):
    """synth's dense shapes and config = what our converter makes of the real model (built on the
    meta device from its published config, first 8 layers: 6 DeltaNet + 2 attention)."""
    import transformers

    from flashmoe_plugin.convert.hf import find_architecture
    from flashmoe_plugin.convert.synth import _dense_shapes, config_for
    cfg_name, model_name, fields = PUBLISHED[like]
    hf_cfg = getattr(transformers, cfg_name)(**{**fields, "num_hidden_layers": 8})
    with torch.device("meta"):
        model = getattr(transformers, model_name)(hf_cfg)
    arch = find_architecture(hf_cfg.to_dict(), like)
    ours = arch.config_from_hf(hf_cfg.to_dict())
    synth_cfg = config_for(like, layers=8)
    for f in ("layer_types", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "num_experts", "top_k",
              "moe_intermediate_size", "shared_expert_intermediate_size", "linear_num_key_heads",
              "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel",
              "partial_rotary_factor", "rope_theta", "vocab_size", "linear_proj", "norm_offset", "moe_layers"):
        assert getattr(synth_cfg, f) == getattr(ours, f), f
    shapes = _dense_shapes(synth_cfg)
    dense = {}
    for name, p in model.named_parameters():
        kind, *rest = arch.classify(name)
        if kind == "dense":
            dense[rest[0]] = tuple(p.shape)
        elif kind == "fused":
            E, I, H = ours.num_experts, ours.moe_intermediate_size, ours.hidden_size
            assert tuple(p.shape) == ((E, 2 * I, H) if rest[1] == "w13" else (E, H, I))
    assert dense == shapes


def test_one_layers_records_are_read_together_and_computed_in_one_call(oracles):
    """Small experts (Qwen3.5: 10 records of ~7 MB per layer and token): a decode step's missing
    records of a layer are all submitted to the reader before the first is waited for, and the
    layer's experts run in one fused backend call."""
    eng = Engine(oracles("qwen3_5_moe_text").store("none"), prefetch="off")
    p, k = eng.pager, eng.config.top_k
    batch = p.request(eng.config.moe_layers[0], list(range(k)))
    assert len(p.reads) == k and all(r.ticket is not None for r in p.reads.values())
    assert len(dict(batch)) == k and not p.reads
    with moe_calls(eng) as calls:
        eng.forward([5])
    assert calls == [k] * len(eng.config.moe_layers)
    eng.close()


@contextlib.contextmanager
def moe_calls(eng):
    """After a 6-token prefill, the number of records of each backend.moe_decode call made inside."""
    calls = []
    moe_decode = eng.backend.moe_decode
    eng.backend.moe_decode = lambda x, recs, w, layout: calls.append(len(recs)) or moe_decode(x, recs, w, layout)
    try:
        eng.forward(prompt(6, seed=9).tolist())
        calls.clear()
        yield calls
    finally:
        del eng.backend.moe_decode  # the instance attribute; the class's method again


@CUDA
def test_cuda_decode_runs_a_layers_experts_in_one_kernel_launch(oracles):
    """The CUDA twin of the test above, on a q4 store (the fused kernel's formats): one backend
    call per MoE layer for a decode step's k experts, and on the device one moe_kernel per layer
    (one cooperative launch; two where the device cannot launch cooperatively)."""
    from torch.profiler import ProfilerActivity, profile
    eng = Engine(oracles("qwen3_5_moe_text").store("q4"), device="cuda", prefetch="off")
    layers, k = len(eng.config.moe_layers), eng.config.top_k
    with moe_calls(eng) as calls:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eng.forward([5])
            torch.cuda.synchronize()
    eng.close()
    assert calls == [k] * layers
    moe = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "moe_kernel" in e.name]
    coop = torch.cuda.get_device_properties(0).major >= 6  # cooperative launch: every GPU since Pascal
    assert len(moe) == layers * (1 if coop else 2), moe


def test_snapshots_are_bounded_and_restore_the_state_of_their_position(oracles):
    from flashmoe_plugin.models.hybrid import SNAPSHOT_EVERY, HybridCache
    cfg = Engine(oracles("qwen3_next").store("none")).config
    c = HybridCache(cfg, 512, torch.float32, "cpu", snapshots=2)

    def step(start, T):  # what a forward does to the cache, with a state that names its position
        c.begin(start)
        c.rec.fill_(start + T)
        c.conv.fill_(-(start + T))
        c.end(start + T, T)

    step(0, 30)  # a prefill chunk: snapshot at 30
    for p in range(30, 2 * SNAPSHOT_EVERY + 5):
        step(p, 1)  # decode: snapshots at 64 and 128 only; the oldest (30) dropped beyond 2
    assert [s[0] for s in c.snapshots] == [SNAPSHOT_EVERY, 2 * SNAPSHOT_EVERY]
    assert c.rewind(100) == SNAPSHOT_EVERY and c.pos == SNAPSHOT_EVERY
    assert (c.rec == SNAPSHOT_EVERY).all() and (c.conv == -SNAPSHOT_EVERY).all()
    step(SNAPSHOT_EVERY, 1)  # a new past from 64 on: the snapshot at 128 is gone
    assert [s[0] for s in c.snapshots] == [SNAPSHOT_EVERY]
    assert c.rewind(10) == 0 and (c.rec == 0).all() and c.pos == 0
