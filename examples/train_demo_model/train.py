#!/usr/bin/env python3
"""Train flashmoe's demo Mixture-of-Experts model (Qwen3-MoE architecture) on the prepared corpus.

    python examples/train_demo_model/train.py --data .device/data --out OUT [--config config.json]
        [--device cuda] [--time-budget 420] [--tiny]

--data holds train.u16.xz / heldout.u16.xz (token ids from train_tokenizer.py --encode) and
tokenizer/ (copied into the output). The model is a plain-PyTorch twin of transformers'
Qwen3MoeForCausalLM with the same parameter names and the same maths (RMSNorm, q/k-norm, RoPE,
GQA attention, softmax router with renormalised top-k, SwiGLU experts fused as gate_up_proj
[E, 2I, H] and down_proj [E, H, I]); experts run as grouped GEMMs (torch._grouped_mm) when that
passes a self-check against a padded-bmm path, else the padded path. At the end the weights are
loaded into transformers' Qwen3MoeForCausalLM, checked logit for logit against this twin, cast to
bf16 and saved with save_pretrained (shards under 16 MB), with train_log.json beside them.

Training: bf16 autocast with fp32 master weights, AdamW, linear warmup then cosine decay. The run
is time-boxed: the first `calibrate_steps` steps are timed, the total step count is fixed from
them so the cosine schedule ends inside the budget. Residual dropout (training only; the exported
architecture has none) and weight decay fight overfitting on a corpus that is seen many times;
held-out loss is evaluated regularly and the best weights are the ones exported.
"""
from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- model

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.nh, self.nkv = c["num_attention_heads"], c["num_key_value_heads"]
        self.hd = c["hidden_size"] // self.nh
        H = c["hidden_size"]
        self.q_proj = nn.Linear(H, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(H, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(H, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, H, bias=False)
        self.q_norm = RMSNorm(self.hd, c["rms_norm_eps"])
        self.k_norm = RMSNorm(self.hd, c["rms_norm_eps"])

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.nh, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.nkv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.nkv != self.nh:
            rep = self.nh // self.nkv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        q, k, v = (t.to(v.dtype) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class Router(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(c["num_experts"], c["hidden_size"]))


class Experts(nn.Module):
    def __init__(self, c):
        super().__init__()
        E, H, I = c["num_experts"], c["hidden_size"], c["moe_intermediate_size"]
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))


EXPERT_IMPL = {"name": "padded_bmm"}


def _expert_ffn_grouped(xs, w13, w2, counts):
    offs = torch.cumsum(counts, 0).to(torch.int32)
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    g, u = h.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(g) * u, w2.transpose(1, 2), offs=offs)


def _expert_ffn_padded(xs, w13, w2, counts):
    """xs rows sorted by expert; counts[e] rows for expert e. Pad each expert to the max count."""
    E = w13.shape[0]
    n = xs.shape[0]
    cap = int(counts.max().item()) if n else 0
    starts = torch.cumsum(counts, 0) - counts
    eid = torch.repeat_interleave(torch.arange(E, device=xs.device), counts, output_size=n)
    pos = torch.arange(n, device=xs.device) - starts[eid]
    buf = xs.new_zeros(E, max(cap, 1), xs.shape[1])
    buf[eid, pos] = xs
    h = torch.bmm(buf, w13.transpose(1, 2))
    g, u = h.chunk(2, dim=-1)
    y = torch.bmm(F.silu(g) * u, w2.transpose(1, 2))
    return y[eid, pos]


class SparseMoeBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.E, self.k, self.norm_topk = c["num_experts"], c["num_experts_per_tok"], c["norm_topk_prob"]
        self.gate = Router(c)
        self.experts = Experts(c)

    def forward(self, x):
        B, T, H = x.shape
        x = x.reshape(-1, H)
        logits = F.linear(x.float(), self.gate.weight.float())              # [N, E] fp32
        probs = logits.softmax(-1)
        topv, topi = probs.topk(self.k, dim=-1)
        if self.norm_topk:
            topv = topv / topv.sum(-1, keepdim=True)
        flat = topi.reshape(-1)
        order = flat.argsort(stable=True)
        tok = order // self.k
        counts = torch.bincount(flat, minlength=self.E)
        cdt = torch.get_autocast_dtype("cuda" if x.is_cuda else "cpu") \
            if torch.is_autocast_enabled(x.device.type) else x.dtype
        w13 = self.experts.gate_up_proj.to(cdt)
        w2 = self.experts.down_proj.to(cdt)
        xs = x.to(cdt)[tok]
        if EXPERT_IMPL["name"] == "grouped_mm":
            y = _expert_ffn_grouped(xs, w13, w2, counts)
        else:
            y = _expert_ffn_padded(xs, w13, w2, counts)
        y = y.float() * topv.reshape(-1)[order, None]
        out = torch.zeros(x.shape[0], H, device=x.device, dtype=torch.float32).index_add_(0, tok, y)
        # load-balancing loss as in transformers' load_balancing_loss_func, for this layer
        frac = counts.float() / x.shape[0]                                   # sums to k
        aux = self.E * (frac * probs.mean(0)).sum()
        return out.to(x.dtype).reshape(B, T, H), aux, topi


class DecoderLayer(nn.Module):
    def __init__(self, c, dropout):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.mlp = SparseMoeBlock(c)
        self.dropout = dropout

    def forward(self, x, cos, sin):
        a = self.self_attn(self.input_layernorm(x), cos, sin)
        x = x + F.dropout(a, self.dropout, self.training)
        m, aux, topi = self.mlp(self.post_attention_layernorm(x))
        x = x + F.dropout(m, self.dropout, self.training)
        return x, aux


class Qwen3MoeTwin(nn.Module):
    def __init__(self, c, dropout=0.0):
        super().__init__()
        self.c = c
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.model.layers = nn.ModuleList(DecoderLayer(c, dropout) for _ in range(c["num_hidden_layers"]))
        self.model.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        if c["tie_word_embeddings"]:
            self.lm_head.weight = self.model.embed_tokens.weight
        hd = c["hidden_size"] // c["num_attention_heads"]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.dropout = dropout

    def init_weights(self, std=0.02):
        L = self.c["num_hidden_layers"]
        for n, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif n.endswith(("o_proj.weight", "down_proj")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * L))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, ids):
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        x = self.model.embed_tokens(ids)
        x = F.dropout(x, self.dropout, self.training)
        auxs = []
        for layer in self.model.layers:
            x, aux = layer(x, cos, sin)
            auxs.append(aux)
        x = self.model.norm(x)
        return self.lm_head(x), torch.stack(auxs).mean()


def hf_config_dict(c):
    return dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
        hidden_act="silu", max_position_embeddings=c["max_position_embeddings"],
        initializer_range=0.02, rms_norm_eps=c["rms_norm_eps"], use_cache=True,
        tie_word_embeddings=c["tie_word_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]},
        attention_bias=False, attention_dropout=0.0, decoder_sparse_step=1,
        moe_intermediate_size=c["moe_intermediate_size"], num_experts_per_tok=c["num_experts_per_tok"],
        num_experts=c["num_experts"], norm_topk_prob=c["norm_topk_prob"], output_router_logits=False,
        router_aux_loss_coef=c["router_aux_loss_coef"], mlp_only_layers=[],
        bos_token_id=None, eos_token_id=0, pad_token_id=0,
    )


# ----------------------------------------------------------------------------- helpers

def load_tokens(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if path.suffix == ".xz":
        raw = lzma.decompress(raw)
    return np.frombuffer(raw, dtype=np.uint16).astype(np.int64)


def pick_expert_impl(device, log):
    """Use torch._grouped_mm if it exists and matches the padded path (forward and gradients)."""
    if not hasattr(torch, "_grouped_mm"):
        log["expert_impl_check"] = "torch._grouped_mm missing"
        return "padded_bmm"
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        E, H, I, n = 8, 64, 32, 200
        xs = torch.randn(n, H, generator=g).to(device, torch.bfloat16)
        w13 = (torch.randn(E, 2 * I, H, generator=g) * 0.1).to(device, torch.bfloat16)
        w2 = (torch.randn(E, H, I, generator=g) * 0.1).to(device, torch.bfloat16)
        counts = torch.tensor([30, 0, 50, 20, 40, 10, 0, 50], device=device)
        outs = []
        for fn in (_expert_ffn_grouped, _expert_ffn_padded):
            a, b, cc = (t.detach().clone().requires_grad_(True) for t in (xs, w13, w2))
            y = fn(a, b, cc, counts)
            (y.float() * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
            outs.append([y.float(), a.grad.float(), b.grad.float(), cc.grad.float()])
        errs = [((p - q).norm() / (q.norm() + 1e-12)).item() for p, q in zip(*outs)]
        log["expert_impl_check"] = {"rel_err_y_dx_dw13_dw2": errs}
        return "grouped_mm" if max(errs) < 2e-2 else "padded_bmm"
    except Exception as e:  # noqa: BLE001 - any failure means: use the plain path
        log["expert_impl_check"] = f"grouped_mm failed: {type(e).__name__}: {e}"[:500]
        return "padded_bmm"


@torch.no_grad()
def evaluate(model, tokens, seq_len, device, batch=64, autocast=True, max_windows=None):
    """Mean next-token loss over non-overlapping windows of the held-out stream."""
    was = model.training
    model.eval()
    n = (len(tokens) - 1) // seq_len
    if max_windows:
        n = min(n, max_windows)
    tot, cnt = 0.0, 0
    t = torch.as_tensor(tokens[: n * seq_len + 1], device=device)
    for i in range(0, n, batch):
        j = min(n, i + batch)
        x = torch.stack([t[w * seq_len:(w + 1) * seq_len] for w in range(i, j)])
        y = torch.stack([t[w * seq_len + 1:(w + 1) * seq_len + 1] for w in range(i, j)])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits, _ = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1), reduction="sum")
        tot += loss.item()
        cnt += y.numel()
    model.train(was)
    return tot / max(cnt, 1)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=".device/data")
    ap.add_argument("--config", default=str(HERE / "config.json"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds of training")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and batch, for a CPU smoke test")
    ap.add_argument("--max-steps", type=int, default=None)
    args = ap.parse_args(argv)

    t_start = time.time()
    cfg = json.loads(Path(args.config).read_text())
    mc, tc = cfg["model"], cfg["train"]
    if args.tiny:
        mc.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=128)
        tc.update(seq_len=64, batch_size=8, warmup_steps=5, calibrate_steps=5, log_every=5)
    if args.time_budget is not None:
        tc["time_budget_s"] = args.time_budget
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    log = {"config": cfg, "argv": sys.argv, "torch": torch.__version__, "device": str(device),
           "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
           "log": [], "evals": []}

    torch.manual_seed(tc["seed"])
    np.random.seed(tc["seed"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    train_tok = load_tokens(data / "train.u16.xz")
    held_tok = load_tokens(data / "heldout.u16.xz")
    log["train_tokens"], log["heldout_tokens"] = int(len(train_tok)), int(len(held_tok))
    print(f"train tokens {len(train_tok):,}  held-out tokens {len(held_tok):,}", flush=True)
    train_gpu = torch.as_tensor(train_tok, device=device)

    EXPERT_IMPL["name"] = pick_expert_impl(device, log)
    log["expert_impl"] = EXPERT_IMPL["name"]
    print("expert implementation:", EXPERT_IMPL["name"], log.get("expert_impl_check"), flush=True)

    model = Qwen3MoeTwin(mc, dropout=tc["dropout"]).to(device)
    model.init_weights()
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    log["params"] = {"total": n_params, "experts": n_expert, "dense": n_params - n_expert,
                     "active_per_token": n_params - n_expert
                     + n_expert * mc["num_experts_per_tok"] // mc["num_experts"]}
    print("params", log["params"], flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tc["lr"], betas=tuple(tc["betas"]), eps=1e-8,
                            fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(tc["seed"])
    B, T = tc["batch_size"], tc["seq_len"]
    n_windows = len(train_tok) - T - 1
    ar = torch.arange(T + 1, device=device)

    def lr_at(step, total):
        if step < tc["warmup_steps"]:
            return tc["lr"] * (step + 1) / tc["warmup_steps"]
        p = min(1.0, (step - tc["warmup_steps"]) / max(1, total - tc["warmup_steps"]))
        return tc["lr"] * (tc["min_lr_ratio"] + (1 - tc["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * p)))

    total = args.max_steps or 10 ** 9
    budget = tc["time_budget_s"]
    best = {"loss": float("inf"), "step": -1, "state": None}
    eval_every = None
    step, t_train0, t_cal = 0, None, None
    tokens_seen = 0
    model.train()
    while step < total:
        if step == 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_train0 = time.time()
        if step == 3 + tc["calibrate_steps"] and args.max_steps is None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per = (time.time() - t_train0) / tc["calibrate_steps"]
            total = max(step + 10, int(budget / (per * 1.04)))        # 4% for evals
            if tc.get("max_epochs"):
                total = min(total, int(tc["max_epochs"] * len(train_tok) / (B * T)))
            log["calibrated_step_s"], log["total_steps"] = per, total
            print(f"calibrated {per * 1e3:.1f} ms/step -> {total} steps, "
                  f"{B * T / per / 1e6:.2f} M tok/s", flush=True)
        if eval_every is None and total < 10 ** 9:
            eval_every = max(10, int(total * tc["eval_every_frac"]))
        lr = lr_at(step, total)
        for gp in opt.param_groups:
            gp["lr"] = lr
        starts = torch.randint(0, n_windows, (B,), device=device, generator=gen)
        batch = train_gpu[starts[:, None] + ar]
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits, aux = model(x)
        ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
        loss = ce + mc["router_aux_loss_coef"] * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        opt.step()
        step += 1
        tokens_seen += B * T
        if step % tc["log_every"] == 0 or step == 1:
            rec = {"step": step, "tokens": tokens_seen, "loss": ce.item(), "aux": aux.item(),
                   "lr": lr, "grad_norm": gn.item(), "t": time.time() - t_start}
            log["log"].append(rec)
            print(json.dumps(rec), flush=True)
        if (eval_every and step % eval_every == 0) or step == total:
            hl = evaluate(model, held_tok, T, device)
            log["evals"].append({"step": step, "tokens": tokens_seen, "heldout_loss": hl,
                                 "t": time.time() - t_start})
            print(f"eval step {step}: held-out loss {hl:.4f} (ppl {math.exp(hl):.2f})", flush=True)
            if hl < best["loss"]:
                best = {"loss": hl, "step": step,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        if t_train0 and time.time() - t_train0 > budget * 1.1:
            print("time budget exceeded; stopping", flush=True)
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_end = time.time()
    if not log["evals"] or log["evals"][-1]["step"] != step:
        hl = evaluate(model, held_tok, T, device)
        log["evals"].append({"step": step, "tokens": tokens_seen, "heldout_loss": hl,
                             "t": time.time() - t_start})
        print(f"eval step {step}: held-out loss {hl:.4f} (ppl {math.exp(hl):.2f})", flush=True)
        if hl < best["loss"]:
            best = {"loss": hl, "step": step, "state": None}
    log["train_seconds"] = t_end - (t_train0 or t_start)
    log["steps"] = step
    log["tokens_seen"] = tokens_seen
    log["epochs"] = tokens_seen / len(train_tok)
    log["final_train_loss"] = float(np.mean([r["loss"] for r in log["log"][-4:]]))
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    log["best_step"], log["best_heldout_loss_autocast"] = best["step"], best["loss"]

    # --- round to bf16 (what is shipped) and evaluate in fp32
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    hl32 = evaluate(model, held_tok, T, device, autocast=False)
    log["heldout_loss_bf16_weights_fp32"] = hl32
    log["heldout_ppl_bf16_weights_fp32"] = math.exp(hl32)
    print(f"best step {best['step']}; held-out loss with bf16 weights, fp32 compute: {hl32:.4f} "
          f"(ppl {math.exp(hl32):.2f})", flush=True)

    # --- export through transformers, checked against the twin
    try:
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        import transformers
        log["transformers"] = transformers.__version__
        hcfg = Qwen3MoeConfig(**{k: v for k, v in hf_config_dict(mc).items()
                                 if k not in ("architectures", "model_type")})
        hf = Qwen3MoeForCausalLM(hcfg).float().eval()
        sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        missing, unexpected = hf.load_state_dict(sd, strict=False)
        missing = [m for m in missing if m != "lm_head.weight" or not mc["tie_word_embeddings"]]
        log["export_missing"], log["export_unexpected"] = list(missing), list(unexpected)
        if missing or unexpected:
            raise RuntimeError(f"state dict mismatch: missing {missing} unexpected {unexpected}")
        if mc["tie_word_embeddings"]:
            hf.tie_weights()
        cpu_twin = Qwen3MoeTwin(mc).float().eval()
        cpu_twin.load_state_dict(sd)
        ids = torch.as_tensor(held_tok[:2 * 128].reshape(2, 128))
        with torch.no_grad():
            a = cpu_twin(ids)[0]
            b = hf(input_ids=ids).logits
        diff = (a - b).abs().max().item()
        log["export_max_abs_logit_diff"] = diff
        print(f"transformers {transformers.__version__}: twin vs Qwen3MoeForCausalLM max |dlogit| {diff:.2e}",
              flush=True)
        hf = hf.to(torch.bfloat16)
        hf.save_pretrained(out, max_shard_size="16MB", safe_serialization=True)
        gc = out / "generation_config.json"
        if gc.exists():
            gc.unlink()
    except Exception as e:  # keep the weights whatever happens: save the twin's own state
        import traceback
        traceback.print_exc()
        log["export_error"] = f"{type(e).__name__}: {e}"
        from safetensors.torch import save_file
        sd = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()
              if not (k == "lm_head.weight" and mc["tie_word_embeddings"])}
        keys = sorted(sd)
        shard, shards, size = {}, [], 0
        for k in keys:
            nb = sd[k].numel() * 2
            if shard and size + nb > 15_000_000:
                shards.append(shard)
                shard, size = {}, 0
            shard[k] = sd[k]
            size += nb
        shards.append(shard)
        for i, s in enumerate(shards):
            save_file(s, str(out / f"twin-{i:02d}.safetensors"))
        (out / "config.json").write_text(json.dumps(hf_config_dict(mc), indent=2))
    log["wall_seconds"] = time.time() - t_start
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({k: log[k] for k in ("steps", "tokens_seen", "epochs", "train_seconds",
                                          "final_train_loss", "best_step",
                                          "heldout_loss_bf16_weights_fp32", "expert_impl")}), flush=True)


if __name__ == "__main__":
    main()
