#!/bin/bash
# Issue 13's H200 row: `flashmoe bench` on `synth --like qwen3.5-397b-a17b` (the first N layers:
# 3.6 GB of q4 experts per layer, 4.3 GB of dense bf16 for the vocabulary's embedding and head)
# with an 8G VRAM tier and 25% of the experts in pinned RAM, K=10 and K=4; then, time allowing,
# K=4 with the VRAM tier scaled to the share 8G is of the whole model's experts (8G / 217 GB =
# 3.7%), the regime the seed system ran in. Also the test that a decode step runs each layer's
# experts in one kernel launch. ~4 min on 16 cores with N=4 (synth ~1 min, each bench ~45 s).
# The package must be built already (FLASHMOE_CUDA=1 pip install -e .): this script builds nothing.
#
# usage (repository root on the GPU machine): bash benchmarks/h200_qwen35.sh OUTDIR [N] [DEVICE]
#   N layers (default 4), DEVICE cuda (default) or cpu (a dry run: no VRAM tier, no CUDA test).
#   STORE=/path reuses that store if it holds a manifest (else synth writes it there; default
#   /tmp/q35-Nl, deleted at the end unless KEEP=1); TOKENS=n decode steps (default 64) after a
#   prompt of half as many tokens (a 32-token prompt already reads ~7 GB of N=4's experts cold).
#   The page cache is dropped (--drop-caches) on CUDA runs only; a CPU run evicts the store's files.
set -u
OUT=${1:?usage: h200_qwen35.sh OUTDIR [N] [DEVICE]}; N=${2:-4}; DEV=${3:-cuda}
STORE=${STORE:-/tmp/q35-${N}l}; mkdir -p "$OUT"; t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
fm() { python3 -c "import sys; from flashmoe_plugin.cli import main; sys.argv[0] = 'flashmoe'; main()" "$@"; }
cat /proc/loadavg > "$OUT/loadavg-start.txt"
if [ ! -f "$STORE/manifest.json" ]; then
  fm synth --like qwen3.5-397b-a17b --layers "$N" --quant q4 "$STORE" > "$OUT/synth.log" 2>&1 || { tail -5 "$OUT/synth.log"; exit 1; }
  CREATED=1; el "synth: $(tail -1 "$OUT/synth.log")"
fi
if [ "$DEV" = cuda ]; then
  timeout 90 python3 -m pytest -q tests/test_hybrid.py -k one_kernel_launch 2>&1 | tail -3 | tee "$OUT/pytest.log"
  el tests
fi

bench() {  # NAME, then bench arguments
  local name=$1; shift
  local budget="--ram-budget 25%" n=${TOKENS:-64}
  [ "$DEV" = cuda ] && budget="--vram-budget ${VRAM:-8G} --ram-budget 25% --drop-caches"
  timeout 150 bash -c "$(declare -f fm); fm bench '$STORE' --device $DEV --json --prompt-tokens $((n / 2)) --tokens $n \
    --direct-io on --io-threads 8 $budget $*" > "$OUT/$name.json" 2> "$OUT/$name.err"
  python3 - "$OUT/$name.json" "$name" <<'EOF' || tail -5 "$OUT/$name.err"
import json, sys
d = json.load(open(sys.argv[1]))
r = lambda v, n=2: None if v is None else round(v, n)
print(sys.argv[2], "K", d["experts_per_token"], "decode", r(d["decode_tok_s"]), "tok/s; io bound", r(d["io_bound_tok_s"]),
      "io_efficiency", r(d["io_efficiency"]), "copy bound", r(d["copy_bound_tok_s"]), "compute bound",
      r(d["compute_bound_tok_s"]), "kernel bound", r(d["kernel_bound_tok_s"]), "hit", r(d["hit_rate"]),
      "tiers", {k: v and v.get("records") for k, v in d["tiers"].items()}, "moe kernels/token",
      d.get("moe_kernels_per_token"), "disk GB/s", r(d["disk_bandwidth_gbps"]))
EOF
  el "$name"
}
host=$([ "$DEV" = cuda ] && echo h200 || echo devbox)
bench "$host-bench-synth-qwen35-${N}l-k10" --experts-per-token 10
bench "$host-bench-synth-qwen35-${N}l-k4" --experts-per-token 4
if [ "$DEV" = cuda ] && [ $(( $(date +%s) - t0 )) -lt 170 ]; then
  VRAM=3.7% bench "$host-bench-synth-qwen35-${N}l-k4-vram3.7pct" --experts-per-token 4
fi
cat /proc/loadavg > "$OUT/loadavg-end.txt"
[ "${CREATED:-0}" = 1 ] && [ "${KEEP:-0}" != 1 ] && rm -rf "$STORE" && el "removed $STORE"
el done
