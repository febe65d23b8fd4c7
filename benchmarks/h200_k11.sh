#!/bin/bash
# Issue 9 scope 4 (session 9, k11): the cooperative expert kernel's fixed costs, main's build against
# this tree's (and builds of other fm_kernels.cu variants) in one H200 call; run inside the shipped
# tree (/work/helpers/ship k11; each other build's _kernels_cuda .so in ../NAME-so, built here with
# /work/helpers/build312). Each step is cut by `timeout` so the call ends inside DEADLINE s:
#   1. the Mixtral and Qwen3.5 decode layers with each build in turn, main's first and last
#      (benchmarks/expert_layer_ab.py, one process each)
#   2. the CUDA tests of the kernels with each build but main's
#   3. rival row 6's decode (32 layers q4, every expert in VRAM, q4 dense): the build fastest on the
#      Mixtral layer, then main's
# BUILDS: "main v1 ..." (../NAME-so; "tree" is this tree's). Results in $OUT.
set -u
OUT=${OUT:-/tmp/k11-out}
mkdir -p "$OUT" /tmp/rival
DEADLINE=${DEADLINE:-165}
T0=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/progress.log"; }
so_of() {  # the build's .so (main2: main's again; tree: none, the tree's own)
  local n=$1; [ $n = tree ] && return; [ $n = main2 ] && n=main
  ls "$PWD"/../$n-so/_kernels_cuda*.so 2>/dev/null | head -1
}
fm() { python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import expert_kernels as k; k.swap(); from flashmoe_plugin.cli import main; sys.argv[0]='flashmoe'; main()" "$@"; }
STORE=${STORE:-/tmp/rival/mixtral-q4-32l}
BUILDS=${BUILDS:-main tree}
(FMC_KERNELS_SO= fm synth ${SYNTH_ARGS:---like mixtral-8x7b --quant q4} $STORE > "$OUT/synth.log" 2>&1; echo "synth rc $?" >> "$OUT/synth.log") &
SYN=$!
for b in $BUILDS main2; do
  so=$(so_of $b); [ $b = tree ] || [ -n "$so" ] || continue
  log "ab $b"
  FMC_KERNELS_SO=$so timeout 35 python3 benchmarks/expert_layer_ab.py --label $b --variants $b: --rounds ${ROUNDS:-9} \
    --json "$OUT/ab-$b.json" 2>&1 | grep -v Warning | grep " us " | tee -a "$OUT/progress.log"
done
TREE_SO=$(ls flashmoe_plugin/_kernels_cuda*.so); cp "$TREE_SO" /tmp/tree-kernels.so
for b in $BUILDS; do
  [ $b = main ] && continue
  so=$(so_of $b); [ -n "$so" ] && cp "$so" "$TREE_SO"
  log "tests $b"
  timeout 40 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py tests/test_cuda_ring_depth.py \
    tests/test_cuda_pdl.py > "$OUT/tests-$b.log" 2>&1
  log "tests $b: $(tail -1 "$OUT/tests-$b.log")"
  cp /tmp/tree-kernels.so "$TREE_SO"
done
BEST=$(python3 -c "
import json, sys
best = min((json.load(open(f'$OUT/ab-{b}.json'))['layers']['mixtral']['variants'][b]['us'], b) for b in sys.argv[1:] if b != 'main')
print(best[1])" $BUILDS 2>/dev/null || echo tree)
wait $SYN
log "synth: $(tail -1 "$OUT/synth.log"); best on the Mixtral layer: $BEST"
bench() {  # bench BUILD
  local T=$(( $(left) - 3 ))
  [ $T -gt 15 ] || { log "no time for decode $1"; return; }
  log "decode $1 ($T s)"
  FMC_KERNELS_SO=$(so_of $1) timeout $T python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import expert_kernels as k; k.swap(); from flashmoe_plugin.cli import main; sys.argv[0]='flashmoe'; main()" \
    bench $STORE --json --prompt-tokens 512 --tokens 32 --no-compute-bound --device cuda --dense-quant q4 \
    > "$OUT/decode-$1.json" 2> "$OUT/decode-$1.log"
  python3 -c "
import json, sys
r = json.load(open(sys.argv[1]))
moe = [k for k in r.get('kernel_us_by_name', []) if 'moe_kernel' in k[0]]
print({k: r.get(k) for k in ('decode_tok_s', 'prefill_tok_s', 'host_ms_per_token', 'kernel_us_per_token')}, 'moe', moe)" \
    "$OUT/decode-$1.json" 2>&1 | tail -1 | tee -a "$OUT/progress.log"
}
bench $BEST
[ -n "$(so_of main)" ] && bench main
log done
