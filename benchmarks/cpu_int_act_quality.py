"""What integer activations change in the demo model's decode (issue 10): logits and perplexity.

    python benchmarks/cpu_int_act_quality.py [--windows 2] [--tokens 128] [--json FILE]

The demo model's held-out windows (as benchmarks/dense_quant_ppl.py; the first --tokens positions), decoded one token at a time
(the path the integer kernels serve: T = 1), once with integer activations and once with fp32
ones (`set_int_act`), for the dense part as floats and as q8 (`--dense-quant q8`, computed by the
same kernels): decode perplexity of each, the largest |logit difference| between the two modes,
and how often their argmax agrees.
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from flashmoe_plugin import demo_model_path
from flashmoe_plugin.kernels.cpu_backend import _load
from flashmoe_plugin.runtime.engine import Engine


def decode_logits(dense_quant: str, windows, L: int) -> torch.Tensor:
    eng = Engine(demo_model_path(), n_ctx=L, prefetch="off", backend="cpu", dense_quant=dense_quant)
    out = []
    for w in windows:
        eng.reset()
        out.append(torch.cat([eng.forward(w[i:i + 1]) for i in range(L)]))
    eng.close()
    return torch.stack(out)  # [windows, L, vocab]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="positions decoded per window (<= seq_len)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    K, why = _load()
    if K is None:
        raise SystemExit(why)
    data = json.loads((demo_model_path().parent / "heldout_slice.json").read_text())
    S, ids = data["seq_len"], data["token_ids"]
    L = min(a.tokens, S)
    windows = [torch.tensor(ids[k * S:k * S + L + 1]) for k in range(a.windows)]
    targets = torch.stack([w[1:] for w in windows])
    res = {"what": __doc__.splitlines()[0], "windows": a.windows, "positions_per_window": L, "isa": K.isa(), "results": {}}
    before = K.int_act()
    try:
        for dq in ("none", "q8"):
            logits = {}
            for on in (True, False):
                K.set_int_act(on)
                logits[on] = decode_logits(dq, [w[:-1] for w in windows], L)
            ppl = {on: math.exp(F.cross_entropy(lg.flatten(0, 1), targets.flatten()).item()) for on, lg in logits.items()}
            diff = (logits[True] - logits[False]).abs()
            r = {"ppl_int": ppl[True], "ppl_f32": ppl[False], "max_abs_logit_diff": diff.max().item(),
                 "mean_abs_logit_diff": diff.mean().item(), "logit_scale_max_abs": logits[False].abs().max().item(),
                 "argmax_agreement": (logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean().item()}
            res["results"][f"dense {dq}"] = r
            print(f"dense {dq}: ppl int {r['ppl_int']:.4f} f32 {r['ppl_f32']:.4f}, max |dlogit| "
                  f"{r['max_abs_logit_diff']:.2e} (mean {r['mean_abs_logit_diff']:.1e}), argmax agree "
                  f"{r['argmax_agreement']:.4f}", flush=True)
    finally:
        K.set_int_act(before)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
