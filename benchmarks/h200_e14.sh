#!/bin/bash
# Issue 9 (session 11, e14): the expert kernel's weight stream, in ONE H200 call.
# Run inside the shipped tree (/work/helpers/ship e14); main's _kernels_cuda .so lies in ../so-main,
# the stream microbenchmark (benchmarks/stream_ceiling.cu, built here) in ../bin/stream_ceiling.
#   1. stream_ceiling: the Mixtral layer's bytes read by the kernel's access patterns with no math
#      (plain loads; the cp.async ring at 3/4/6 stages; bulk copies at several stage sizes and depths)
#   2. expert_fixed_cost.py: main's build and this tree's (bulk stream where the ring runs one block per
#      SM, e12's 4-stage rule) in one process, interleaved: the tree with bulk=0 (the rule alone), bulk=1
#      (the default), bulk=2 (bulk wherever it fits)
#   3. the CUDA kernel tests with this tree (bulk on: bit-identical to the ring)
#   4. rival row 6's decode (32 layers q4, every expert in VRAM, --dense-quant q4) with this tree, then main's
#   5. ncu of one Mixtral layer, bulk and ring, where time is left
# Each step is cut by `timeout` so the call ends inside DEADLINE s. Results in $OUT.
set -u
OUT=${OUT:-/tmp/e14-out}; export OUT
LOGS=/tmp/e14-logs
mkdir -p "$OUT" "$LOGS" /tmp/rival
trap 'tar -C "$LOGS" -czf "$OUT/logs.tgz" . 2>/dev/null' EXIT  # at most 8 files come back from $OUT
DEADLINE=${DEADLINE:-170}
T0=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/progress.log"; }
STORE=${STORE:-/tmp/rival/mixtral-q4-32l}
MAIN_SO=$(ls "$PWD"/../so-main/_kernels_cuda*.so 2>/dev/null | head -1)
fm() { python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import expert_kernels as k; k.swap(); from flashmoe_plugin.cli import main; sys.argv[0]='flashmoe'; main()" "$@"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$LOGS/gpu.txt" 2>&1
cat /proc/loadavg > "$LOGS/loadavg-start.txt"
log "main so: $MAIN_SO"
(FMC_KERNELS_SO= fm synth --like mixtral-8x7b --quant q4 $STORE > "$LOGS/synth.log" 2>&1; echo "synth rc $?" >> "$LOGS/synth.log") &
SYN=$!
log "stream ceiling"
timeout 30 ../bin/stream_ceiling --json "$OUT/stream.json" 2>&1 | tee "$LOGS/stream.log" | tee -a "$OUT/progress.log"
log "fixed cost"
timeout ${AB_TIMEOUT:-70} python3 benchmarks/expert_fixed_cost.py --label e14 --json "$OUT/fixed-cost.json" --rounds 7 \
  --builds main=../so-main e14=tree --cases ${CASES:-mixtral,mixtral4,mixtral1,qwen35,qwen1,qwen8} \
  --variants ${VARIANTS:-main: e14:bulk=0 e14: e14:bulk=2} 2>&1 \
  | grep -v Warning | tee "$LOGS/fixed-cost.log" | grep -E " us |fit |copy |Error|error" | tee -a "$OUT/progress.log"
log "tests e14"
timeout 45 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_bulk.py tests/test_cuda_kernels.py \
  tests/test_cuda_ring_depth.py tests/test_cuda_pdl.py > "$LOGS/tests-e14.log" 2>&1
log "tests e14: $(tail -1 "$LOGS/tests-e14.log")"
wait $SYN; log "synth: $(tail -1 "$LOGS/synth.log")"
bench() {  # bench NAME SO
  local T=$(( $(left) - 2 ))
  [ $T -gt 15 ] || { log "no time for decode $1"; return; }
  log "decode $1 ($T s)"
  FMC_KERNELS_SO=$2 timeout $T python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import expert_kernels as k; k.swap(); from flashmoe_plugin.cli import main; sys.argv[0]='flashmoe'; main()" \
    bench $STORE --json --prompt-tokens 512 --tokens 32 --no-compute-bound --device cuda --dense-quant q4 \
    > "$OUT/decode-$1.json" 2> "$LOGS/decode-$1.log"
  python3 -c "
import json, sys
r = json.load(open(sys.argv[1]))
moe = [k for k in r.get('kernel_us_by_name', []) if 'moe_kernel' in k[0]]
print({k: r.get(k) for k in ('decode_tok_s', 'decode_token_ms', 'prefill_warm_tok_s', 'host_ms_per_token', 'kernel_us_per_token')}, 'moe', moe)" \
    "$OUT/decode-$1.json" 2>&1 | tail -1 | tee -a "$OUT/progress.log"
}
bench e14 ""
bench main "$MAIN_SO"
if [ $(left) -gt 25 ] && command -v ncu > /dev/null; then
  log "ncu"
  timeout $(( $(left) - 3 )) ncu --clock-control none --kernel-name regex:moe_kernel --launch-count 8 \
    --metrics dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,gpu__time_duration.sum,sm__inst_executed.sum \
    python3 benchmarks/expert_fixed_cost.py --label ncu --builds e14=tree --cases mixtral --rounds 1 --total-gib 0.4 \
    --variants e14: e14:bulk=0 > "$OUT/ncu.txt" 2>&1
  log "ncu: $(grep -c moe_kernel "$OUT/ncu.txt") kernel lines"
fi
cat /proc/loadavg > "$LOGS/loadavg-end.txt"
log done
