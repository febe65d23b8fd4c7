"""Look-ahead precision per distance on the demo model's real routing (greedy decode, 128 tokens):
the predictor's guess for layer L+d from the hidden state after layer L (issue 10, w10c).
    python benchmarks/look_ahead_precision.py > benchmarks/results/devbox-w10c-look-ahead-demo.json"""
import json, sys, torch
from pathlib import Path
import flashmoe_plugin
from flashmoe_plugin.runtime.engine import Engine
store = Path(flashmoe_plugin.__file__).parent / "demo_model" / "store"
eng = Engine(store, prefetch="on", prefetch_depth=8, n_ctx=512)
text = ("Once upon a time there was a small model that streamed its experts from a disk. "
        "It read the weights it needed, kept the hot ones in memory and computed the rest.")
ids = eng.tokenizer.encode(text) if hasattr(eng.tokenizer, "encode") else eng.tokenize(text.encode())
logits = eng.forward(ids, last_only=True)[-1]
for _ in range(128):
    t = int(torch.argmax(logits))
    logits = eng.forward([t], last_only=True)[-1]
snap = eng.predictor.snapshot()
print(json.dumps({"store": str(store), "layers": len(eng._moe_order), "experts": eng.config.num_experts,
                  "top_k": eng.config.top_k, "decode_tokens": 128,
                  "by_distance": {d: (round(v["precision"], 3), v["guesses"]) for d, v in snap["by_distance"].items() if v["precision"] is not None}}))
eng.close()
