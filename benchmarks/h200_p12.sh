#!/bin/bash
# p12's one H200 call (issue 10): the n_cpu_moe token as one graph + one host call
# (runtime/hybrid_token.py). In order, within LIMIT seconds: the 32-layer Mixtral store synthesized
# in the background while the hybrid GPU tests run; rival.py's rows 1 and 3 (--n-cpu-moe 24 / 32,
# its exact flashmoe flags) on this tree; then, in the time left, the in-process A/B and breakdown
# (benchmarks/hybrid_breakdown.py: segmented, i.e. main's path, against fused, one engine).
# usage (in .device/p12/src after `source prep.sh`): bash benchmarks/h200_p12.sh [LIMIT_S]
set -u
LIMIT=${1:-175}; T0=$(date +%s)
source benchmarks/h200_common.sh
el() { echo $(( $(date +%s) - T0 )); }
{ nproc; cat /sys/kernel/mm/transparent_hugepage/enabled; free -g; cat /proc/loadavg; } >> "$OUT/progress.log" 2>&1
W=/tmp/rival
synth_store $W/mixtral-q4-32l "$OUT/synth.log"
timeout 60 python3 -m pytest -q -x tests/test_hybrid_cpu_gpu.py -k "gpu or fused or hybrid_plan" -rs > "$OUT/tests.log" 2>&1
log "tests $(el) s: $(tail -1 "$OUT/tests.log")"
wait $SYNTH; log "synth $(el) s: $(tail -2 "$OUT/synth.log" | head -1)"
row() {  # ROW LABEL
  local left=$(( LIMIT - $(el) )); [ $left -lt 45 ] && { log "row $1 skipped ($left s left)"; return; }
  timeout $(( left - 2 )) python3 benchmarks/rival.py --src /nonexistent --engines flashmoe --rows $1 --work $W \
    --out "$OUT/rival-$2.json" >> "$OUT/progress.log" 2>&1
  log "row $1 $(el) s: $(python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['rows'][sys.argv[2]]['flashmoe']; \
print(r.get('decode_tok_s'), (r.get('n_cpu_moe_split') or {}).get('decode_plan'), r.get('error','')[-400:])" "$OUT/rival-$2.json" $1 2>&1 | tail -3)"
}
row 1 p12-row1
row 3 p12-row3
left=$(( LIMIT - $(el) ))
if [ $left -ge 35 ]; then
  timeout $(( left - 2 )) python3 benchmarks/hybrid_breakdown.py $W/mixtral-q4-32l "$OUT/breakdown24.json" --n-cpu-moe 24 \
    --tokens 8 --rounds 2 > "$OUT/breakdown.log" 2>&1
  log "breakdown $(el) s: $(tail -c 1500 "$OUT/breakdown.log")"
fi
log "done $(el) s"
