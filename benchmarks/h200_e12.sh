#!/bin/bash
# Issue 9 scope 4 (session 12, e12): the cooperative expert kernel's fixed cost per layer, in ONE H200 call.
# Run inside the shipped tree (/work/helpers/ship e12); the builds' _kernels_cuda .so lie in ../so-NAME
# (or ../sos.txz; built on the box with the tree's other sources and one fm_kernels.cu variant each;
# "main" is the tree's own, main's fm_kernels.cu).
#   1. benchmarks/expert_fixed_cost.py: every build in one process, interleaved rounds: the Mixtral and
#      Qwen3.5 layers, 1-vs-2 (Mixtral) and 1/2/4/8 (Qwen3.5) experts over distinct records (a line:
#      fixed us + bytes / rate), and the Qwen3.5 layers over the same records every call (L2 resident)
#   2. the CUDA kernel tests with the winner (bit-identical, fastest over the layers relative to main's)
#   3. rival row 6's decode (32 layers q4, every expert in VRAM, --dense-quant q4) with the builds in DECODES
#      (default: the winner, then main's); the graph-decode tests with the winner where time is left
# Each step is cut by `timeout` so the call ends inside DEADLINE s. Results in $OUT.
set -u
OUT=${OUT:-/tmp/e12-out}; export OUT
LOGS=/tmp/e12-logs
mkdir -p "$OUT" "$LOGS" /tmp/rival
trap 'tar -C "$LOGS" -czf "$OUT/logs.tgz" . 2>/dev/null' EXIT  # at most 8 files come back from $OUT
DEADLINE=${DEADLINE:-172}
T0=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/progress.log"; }
so_of() { ls "$PWD"/../so-$1/_kernels_cuda*.so 2>/dev/null | head -1; }
fm() { python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import expert_kernels as k; k.swap(); from flashmoe_plugin.cli import main; sys.argv[0]='flashmoe'; main()" "$@"; }
STORE=${STORE:-/tmp/rival/mixtral-q4-32l}
BUILDS=${BUILDS:-main bar split prep4 cand}
VARIANTS=${VARIANTS-main: bar: split: prep4: cand: main:mode=2}  # call 2: see the README
# the builds travel as ../sos.txz (the carry limit); main's is the tree's own where none came
[ -f ../sos.txz ] && tar xJf ../sos.txz -C ..
[ -d ../so-main ] || { mkdir -p ../so-main && cp flashmoe_plugin/_kernels_cuda*.so ../so-main/; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$LOGS/gpu.txt" 2>&1
SYN=
if [ "${DECODES-unset}" != "" ]; then  # the decode's store (none when DECODES is set empty)
  (FMC_KERNELS_SO= fm synth ${SYNTH_ARGS:---like mixtral-8x7b --quant q4} $STORE > "$LOGS/synth.log" 2>&1; echo "synth rc $?" >> "$LOGS/synth.log") &
  SYN=$!
fi
log "fixed cost: $BUILDS"
timeout ${AB_TIMEOUT:-75} python3 benchmarks/expert_fixed_cost.py --label e12 --json "$OUT/fixed-cost.json" \
  --builds $(for b in $BUILDS; do echo "$b=../so-$b"; done) ${VARIANTS:+--variants $VARIANTS} 2>&1 \
  | grep -v Warning | tee "$LOGS/fixed-cost.log" | grep -E " us |fit |copy |Error|error" | tee -a "$OUT/progress.log"
# The winner: bit-identical to main's everywhere, the lowest geometric mean of its time over main's on the
# distinct-record layers (call 1 chose by the Mixtral layer, Qwen3.5 no slower; it picked the same build).
WIN=$(python3 -c "
import json, math, os, sys
c = json.load(open(os.environ['OUT'] + '/fixed-cost.json'))['cases']
cs = [e['variants'] for n, e in c.items() if n.endswith('@0')]
def score(b):
    if not all(v[b]['bit_identical_to_first'] for v in cs): return None
    return math.exp(sum(math.log(v[b]['us'] / v['main']['us']) for v in cs) / len(cs))
sc = {b: score(b) for b in sys.argv[1:] if b != 'main'}
print(sc, file=sys.stderr)
ok = {b: s for b, s in sc.items() if s is not None}
print(min(ok, key=ok.get) if ok else 'none')" $BUILDS 2>>"$OUT/progress.log" || echo none)
[ -n "$WIN" ] || WIN=none
log "winner (bit-identical, lowest geometric mean of time / main's): $WIN"
[ "$WIN" = none ] && { log "no bit-identical candidate: no tests, no decode"; exit 0; }
TREE_SO=$(ls flashmoe_plugin/_kernels_cuda*.so); cp "$TREE_SO" /tmp/tree-kernels.so
cp "$(so_of $WIN)" "$TREE_SO"
log "tests $WIN"
timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py tests/test_cuda_ring_depth.py \
  tests/test_cuda_pdl.py > "$LOGS/tests-$WIN.log" 2>&1
log "tests $WIN: $(tail -1 "$LOGS/tests-$WIN.log")"
cp /tmp/tree-kernels.so "$TREE_SO"
[ -n "$SYN" ] && { wait $SYN; log "synth: $(tail -1 "$LOGS/synth.log")"; }
bench() {  # bench BUILD
  local T=$(( $(left) - 2 ))
  [ $T -gt 15 ] || { log "no time for decode $1"; return; }
  log "decode $1 ($T s)"
  FMC_KERNELS_SO=$(so_of $1) timeout $T python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import expert_kernels as k; k.swap(); from flashmoe_plugin.cli import main; sys.argv[0]='flashmoe'; main()" \
    bench $STORE --json --prompt-tokens 512 --tokens 32 --no-compute-bound --device cuda --dense-quant q4 \
    > "$OUT/decode-$1.json" 2> "$LOGS/decode-$1.log"
  python3 -c "
import json, sys
r = json.load(open(sys.argv[1]))
moe = [k for k in r.get('kernel_us_by_name', []) if 'moe_kernel' in k[0]]
print({k: r.get(k) for k in ('decode_tok_s', 'prefill_warm_tok_s', 'host_ms_per_token', 'kernel_us_per_token')}, 'moe', moe)" \
    "$OUT/decode-$1.json" 2>&1 | tail -1 | tee -a "$OUT/progress.log"
}
for b in ${DECODES-$WIN main}; do bench $b; done
if [ $(left) -gt 25 ]; then  # time left: the graph-decode tests with the winner too
  cp "$(so_of $WIN)" "$TREE_SO"
  timeout $(( $(left) - 2 )) python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_graph_decode.py > "$LOGS/tests-graph-$WIN.log" 2>&1
  log "graph tests $WIN: $(tail -1 "$LOGS/tests-graph-$WIN.log")"
  cp /tmp/tree-kernels.so "$TREE_SO"
fi
log done
