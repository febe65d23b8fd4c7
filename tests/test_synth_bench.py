"""synth stores (exact shapes, random weights), profile and the store bench's JSON."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from flashmoe_plugin import quant as Q
from flashmoe_plugin.bench.store import GPU_KEYS, PREDICTOR_KEYS, run_bench
from flashmoe_plugin.cli import cli
from flashmoe_plugin.convert.synth import _fill_records, _Random, config_for, store_bytes, synth
from flashmoe_plugin.plugins import manager
from flashmoe_plugin.runtime.engine import Engine
from flashmoe_plugin.store.format import Store
from flashmoe_plugin.store.layout import RecordLayout

BENCH_KEYS = {
    "decode_tok_s", "prefill_tok_s", "ttft_s", "hit_rate", "hit_rate_run", "tiers", "bytes_read_per_token",
    "missed_bytes_per_token", "stall_ms_per_token", "disk_bandwidth_gbps", "disk", "io_bound_tok_s",
    "io_efficiency", "belady_hit_rate", "hit_rate_vs_belady", "compute_bound_tok_s", "compute_bound_reason",
    "policy", "ram_budget", "capacity_records", "prompt_tokens", "tokens", "notes", "prefetch", "prefetch_stats",
    "host_capacity_records", *GPU_KEYS, *PREDICTOR_KEYS}


@pytest.fixture(scope="module")
def runner():
    manager().hook.register_commands(cli=cli)
    return CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("synth") / "tiny", "tiny", quant="q4")


def test_presets_have_the_real_shapes():
    c = config_for("mixtral-8x7b")
    assert (c.hidden_size, c.moe_intermediate_size, c.num_experts, c.top_k, c.vocab_size, c.num_layers,
            c.num_heads, c.num_kv_heads) == (4096, 14336, 8, 2, 32000, 32, 32, 8)
    experts, dense = store_bytes(c, "q4")
    assert 24e9 < experts < 27e9 and 2.5e9 < dense < 3.5e9  # ~25 GB of q4 experts + bf16 dense part
    c = config_for("qwen3.5-397b-a17b")
    assert (c.hidden_size, c.moe_intermediate_size, c.num_experts, c.top_k, c.num_layers) == (4096, 1024, 512, 10, 60)
    # Flash-MoE's 4-bit expert: 7,077,888 bytes (bf16 scales/biases: ours are fp16, same size)
    assert RecordLayout.build("q4", 4096, 1024).size == 7077888
    c = config_for("deepseek-v3", layers=5)
    assert (c.num_experts, c.top_k, c.moe_intermediate_size, c.moe_layers) == (256, 8, 2048, [3, 4])
    assert config_for("deepseek-v3", layers=1).moe_layers == [0]
    c = config_for("qwen3-30b-a3b", layers=2)
    assert (c.num_experts, c.top_k, c.moe_intermediate_size, c.num_layers) == (128, 8, 768, 2)


@pytest.mark.parametrize("fmt", ["q4", "q8", "q2", "bf16"])
def test_random_records_decode_to_plausible_weights(fmt):
    layout = RecordLayout.build(fmt, 256, 128)
    recs = np.empty((3, layout.size), np.uint8)
    _fill_records(_Random(0), recs, layout)
    assert len({bytes(r) for r in recs}) == 3
    import torch
    for part in layout.parts:
        w = Q.dequantize(torch.from_numpy(recs[0, part.offset:part.offset + part.nbytes].copy()), fmt, part.shape)
        target = 0.5 / part.shape[1] ** 0.5  # synth's weight scale: ~0.5 / sqrt(fan-in)
        assert torch.isfinite(w).all() and target / 4 < w.std().item() < target * 4, (part.name, w.std())


def test_synth_store_is_valid_and_runs(tiny, runner, tmp_path):
    s = Store.open(tiny)
    assert s.verify() == [] and s.manifest["source"]["type"] == "synth"
    eng = Engine(tiny)
    ids = eng.tokenizer.encode("Hello, experts!")
    assert ids and max(ids) < s.config.vocab_size
    assert np.isfinite(eng.forward(ids).numpy()).all()
    eng.close()
    r = runner.invoke(cli, ["synth", "--like", "tiny", str(tiny)])
    assert r.exit_code != 0 and "exists" in r.output


def test_synth_cli(runner, tmp_path):
    r = runner.invoke(cli, ["synth", "--like", "tiny", "--quant", "q8", "--layers", "1", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    s = Store.open(tmp_path / "s")
    assert s.quant == "q8" and len(s.layers) == 1 and s.verify() == []
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left


def test_profile_then_bench_json(tiny, runner):
    r = runner.invoke(cli, ["profile", str(tiny), "-n", "4", "--json"])
    assert r.exit_code == 0, r.output
    prof = json.loads(r.output)
    assert (tiny / "routing_stats.json").is_file() and (tiny / "routing_trace.npz").is_file()
    assert prof["tokens_generated"] == 4 * prof["prompts"]
    size = Store.open(tiny).layout.size
    r = runner.invoke(cli, ["bench", str(tiny), "--json", "--tokens", "4", "--prompt-tokens", "24",
                            "--ram-budget", str(5 * size), "--policy", "static", "--prefetch", "on"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert BENCH_KEYS <= set(out), BENCH_KEYS - set(out)
    assert all(out[k] is None for k in GPU_KEYS) and any("GPU keys" in n for n in out["notes"])
    assert 0 <= out["predictor_precision"] <= 1 and 0 <= out["predictor_recall"] <= 1
    assert out["prefetch_stats"]["prefetch_reads"] > 0
    assert out["capacity_records"] == 5 and out["prompt_tokens"] == 24 and out["tokens"] == 4
    assert out["compute_bound_tok_s"] is not None and 0 <= out["belady_hit_rate"] <= 1
    assert "pinned" in out["policy_note"]


def test_bench_everything_resident(tiny):
    out = run_bench(tiny, tokens=2, prompt_tokens=8, compute_bound=False)
    assert BENCH_KEYS <= set(out)
    # every record fits: only first-use misses, which no policy avoids
    assert out["capacity_records"] == out["total_records"] and out["hit_rate_run"] == out["belady_hit_rate"]
    assert (out["io_bound_tok_s"] is None) == (out["missed_bytes_per_token"] == 0)
    assert (out["io_efficiency"] is None) == (out["io_bound_tok_s"] is None)
    # warm prefill: the median of the warm prompts (several: each takes milliseconds here)
    warm = out["prefill_warm_tok_s_all"]
    assert len(warm) == 5 and out["prefill_warm_tok_s"] == sorted(warm)[2] and "median" in out["prefill_warm_method"]
    assert out["prefill_warm_after_profiler_tok_s"] is None  # a CPU run profiles nothing


def test_bench_dtype(tiny):
    """--dtype reaches the engines (the measured one and the compute-bound one)."""
    out = run_bench(tiny, tokens=2, prompt_tokens=8, dtype="bfloat16")
    assert out["dtype"] == "bfloat16" and out["compute_bound_tok_s"] > 0
    assert run_bench(tiny, tokens=2, prompt_tokens=8, compute_bound=False, dtype="float32")["dtype"] == "float32"
    with pytest.raises(ValueError, match="dtype"):
        run_bench(tiny, dtype="fp8")


def test_bench_errors(tiny, runner):
    r = runner.invoke(cli, ["bench"])
    assert r.exit_code != 0 and "STORE" in r.output
    r = runner.invoke(cli, ["bench", str(tiny), "--device", "cuda"])
    import torch
    if not torch.cuda.is_available():
        assert r.exit_code != 0 and "cuda" in r.output.lower()
    r = runner.invoke(cli, ["bench", str(tiny), "--ram-budget", "1K"])
    assert r.exit_code != 0 and "minimum" in r.output


def test_belady_policy_replays_a_saved_bench_run(tiny):
    size = Store.open(tiny).layout.size
    kw = dict(tokens=6, prompt_tokens=24, ram_budget=5 * size, compute_bound=False)
    lru = run_bench(tiny, policy="lru", save_trace=tiny / "routing_trace.npz", **kw)
    opt = run_bench(tiny, policy="belady", **kw)
    # same prompt and seed: the same requests, and the replay reaches the simulated optimum
    assert opt["requests"] == lru["requests"] and opt["belady_hit_rate"] == lru["belady_hit_rate"]
    assert opt["hit_rate_run"] == opt["belady_hit_rate"] >= lru["hit_rate_run"]


def test_bench_decode_at_depth(tiny, runner):
    """--depth times the decode again from that many tokens of context (llama-bench's -d / tg): the
    steps run at the positions it reports, and the main figure stays the decode after the prompt."""
    out = run_bench(tiny, tokens=3, prompt_tokens=8, compute_bound=False, depth=0)
    d = out["decode_at_depth"]
    assert d["depth"] == 0 and d["positions"] == [1, 3] and len(d["token_ms"]) == 3 and d["tok_s"] > 0
    assert out["prompt_tokens"] == 8 and len(out["decode_token_ms"]) == 3
    d = run_bench(tiny, tokens=2, prompt_tokens=4, compute_bound=False, depth=11)["decode_at_depth"]
    assert d["positions"] == [11, 12]  # past the prompt's length: its ids repeated, n_ctx grown to hold them
    assert "decode_at_depth" not in run_bench(tiny, tokens=1, prompt_tokens=4, compute_bound=False)
    with pytest.raises(ValueError, match="--depth"):
        run_bench(tiny, tokens=1, prompt_tokens=4, depth=-1)
    r = runner.invoke(cli, ["bench", str(tiny), "--tokens", "2", "--prompt-tokens", "4", "--depth", "0",
                            "--no-compute-bound"])
    assert r.exit_code == 0 and "from depth 0 (llama-bench's way)" in r.output, r.output
