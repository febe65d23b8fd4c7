"""What one position of context costs in the cache, as `flashmoe inspect` reports it and as the
engine allocates it, against the sizes computed from the checkpoint's own config.json."""
import json

import torch
from test_cli import flashmoe

from flashmoe_plugin.runtime.engine import Engine


def theory(hf: dict) -> int:
    """bf16 bytes per token, all layers: MLA caches the KV latent and one shared rotary key;
    GQA caches K and V of every KV head."""
    if "kv_lora_rank" in hf:
        per_layer = hf["kv_lora_rank"] + hf["qk_rope_head_dim"]
    else:
        heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
        per_layer = 2 * heads * (hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    return hf["num_hidden_layers"] * per_layer * 2


def test_cache_bytes_per_token(oracles, family):
    o = oracles(family)
    hf = json.loads((o.hf_dir / "config.json").read_text())
    store = o.store("none")
    info = json.loads(flashmoe("inspect", store, "--json").stdout)
    assert info["kv_cache"]["bytes_per_token"] == theory(hf)
    eng = Engine(store, n_ctx=16, dtype=torch.bfloat16)
    allocated = (eng.kv.k.numel() + eng.kv.v.numel()) * 2 // 16
    eng.close()
    assert allocated == theory(hf)
