#!/bin/bash
# Issue 10's hybrid checks on the H200 in one call (~5 min): CUDA build, the GPU tests of the hybrid
# path, then `flashmoe bench` on a full Mixtral-shaped q4 store for the issue's H200 rows.
# usage (from the repository root on the GPU machine): bash benchmarks/h200_hybrid.sh OUTDIR
set -u
OUT=${1:-/tmp/out}; mkdir -p "$OUT"; t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
FLASHMOE_CUDA=1 FLASHMOE_CUDA_ARCH="-gencode arch=compute_90,code=sm_90" \
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
el built
fm() { python3 -c "import sys; from flashmoe_plugin.cli import main; sys.argv[0] = 'flashmoe'; main()" "$@"; }
[ -f /tmp/m32/manifest.json ] || (fm synth --like mixtral-8x7b --quant q4 /tmp/m32 > "$OUT/synth.log" 2>&1; el synth) &
timeout 120 python3 -m pytest -q tests/test_hybrid_cpu_gpu.py tests/test_cuda_pager.py -k "n_cpu_moe or host_compute" 2>&1 | tail -8 | tee "$OUT/pytest.log"
el tests; wait
for args in "--n-cpu-moe 24" "--n-cpu-moe 32" "--vram-budget 8G --ram-budget 24G"; do
  name=h200-hybrid-$(echo "$args" | tr -d ' -')
  timeout 75 bash -c "$(declare -f fm); fm bench /tmp/m32 --device cuda --json --prompt-tokens 512 --tokens 32 \
    --no-compute-bound --io-threads 8 $args" > "$OUT/$name.json" 2> "$OUT/$name.err"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], 'decode', round(d['decode_tok_s'],2), \
    'prefill cold', round(d['prefill_tok_s'],1), 'warm', round(d['prefill_warm_tok_s'],1), d['tiers']['ram'])" \
    "$OUT/$name.json" "$args" || tail -5 "$OUT/$name.err"
  el "$args"
done
