#!/bin/bash
# Issue 9 scope 4 (session 9, k11): the cooperative expert kernel's fixed costs, main's build against
# this tree's in one H200 call; run inside the shipped tree (/work/helpers/ship k11; main's
# _kernels_cuda .so in ../main-so, built here with /work/helpers/build312). Each step is cut by
# `timeout` so the call ends inside DEADLINE s:
#   1. the Mixtral and Qwen3.5 decode layers, main's build then this tree's then main's again
#      (benchmarks/expert_layer_ab.py, separate processes; out_sha256 compares the outputs)
#   2. the CUDA tests of the kernels (this tree)
#   3. rival row 6's decode (32 layers q4, every expert in VRAM, q4 dense), this tree then main
# Results in $OUT.
set -u
OUT=${OUT:-/tmp/k11-out}
mkdir -p "$OUT" /tmp/rival
DEADLINE=${DEADLINE:-165}
T0=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/progress.log"; }
fm() { python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import expert_kernels as k; k.swap(); from flashmoe_plugin.cli import main; sys.argv[0]='flashmoe'; main()" "$@"; }
MAIN_SO=$(ls "$PWD"/../main-so/_kernels_cuda*.so 2>/dev/null | head -1)
STORE=${STORE:-/tmp/rival/mixtral-q4-32l}
(FMC_KERNELS_SO= fm synth ${SYNTH_ARGS:---like mixtral-8x7b --quant q4} $STORE > "$OUT/synth.log" 2>&1; echo "synth rc $?" >> "$OUT/synth.log") &
SYN=$!
ab() {  # ab LABEL SO
  log "ab $1"
  FMC_KERNELS_SO=$2 timeout 35 python3 benchmarks/expert_layer_ab.py --label $1 --variants $1: --rounds ${ROUNDS:-9} \
    --json "$OUT/ab-$1.json" 2>&1 | grep -v Warning | tail -4 | tee -a "$OUT/progress.log"
}
[ -n "$MAIN_SO" ] && ab main "$MAIN_SO"
ab k11 ""
[ -n "$MAIN_SO" ] && ab main2 "$MAIN_SO"
log "tests"
timeout 45 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py tests/test_cuda_ring_depth.py \
  tests/test_cuda_pdl.py > "$OUT/tests.log" 2>&1
log "tests: $(tail -1 "$OUT/tests.log")"
wait $SYN
log "synth: $(tail -1 "$OUT/synth.log")"
bench() {  # bench LABEL SO
  local T=$(( $(left) - 3 ))
  [ $T -gt 15 ] || { log "no time for decode $1"; return; }
  log "decode $1 ($T s)"
  FMC_KERNELS_SO=$2 timeout $T python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import expert_kernels as k; k.swap(); from flashmoe_plugin.cli import main; sys.argv[0]='flashmoe'; main()" \
    bench $STORE --json --prompt-tokens 512 --tokens 32 --no-compute-bound --device cuda --dense-quant q4 \
    > "$OUT/decode-$1.json" 2> "$OUT/decode-$1.log"
  python3 -c "
import json, sys
r = json.load(open(sys.argv[1]))
moe = [k for k in r.get('kernel_us_by_name', []) if 'moe_kernel' in k[0]]
print({k: r.get(k) for k in ('decode_tok_s', 'prefill_tok_s', 'host_ms_per_token', 'kernel_us_per_token')}, 'moe', moe)" \
    "$OUT/decode-$1.json" 2>&1 | tail -1 | tee -a "$OUT/progress.log"
}
bench k11 ""
[ -n "$MAIN_SO" ] && bench main "$MAIN_SO"
log done
