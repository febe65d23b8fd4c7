#!/bin/bash
# p12's second H200 call (issue 10): the same-call A/B beside h200_p12.sh's rows. Within LIMIT
# seconds: the 32-layer store synthesized; benchmarks/hybrid_breakdown.py on this tree
# (--n-cpu-moe 24: segmented, i.e. main's path, against fused, one engine); rival.py's rows 1 and
# 3 on MAIN_TREE (main's checkout, its compiled modules copied in from MAIN_SO).
# usage (in .device/p12/src after `source prep.sh`): bash benchmarks/h200_p12b.sh MAIN_TREE MAIN_SO [LIMIT_S]
set -u
MINE=$PWD; BASE=$(cd "$1" && pwd); [ -d "$2" ] && cp "$2"/*.so "$BASE/flashmoe_plugin/"; LIMIT=${3:-175}; T0=$(date +%s)
source benchmarks/h200_common.sh
el() { echo $(( $(date +%s) - T0 )); }
{ nproc; free -g; cat /proc/loadavg; (cd "$BASE" && git log --oneline -1 2>/dev/null); } >> "$OUT/progress.log" 2>&1
W=/tmp/rival
synth_store $W/mixtral-q4-32l "$OUT/synth.log"
wait $SYNTH; log "synth $(el) s: $(tail -2 "$OUT/synth.log" | head -1)"
timeout 60 python3 benchmarks/hybrid_breakdown.py $W/mixtral-q4-32l "$OUT/breakdown24.json" --n-cpu-moe 24 \
  --tokens 8 --rounds 2 > "$OUT/breakdown.log" 2>&1
log "breakdown $(el) s: $(tail -c 1500 "$OUT/breakdown.log")"
row() {  # ROW LABEL
  local left=$(( LIMIT - $(el) )); [ $left -lt 50 ] && { log "row $1 skipped ($left s left)"; return; }
  ( cd "$BASE" && export PYTHONPATH="$BASE:/tmp/site" && timeout $(( left - 2 )) python3 benchmarks/rival.py \
    --src /nonexistent --engines flashmoe --rows $1 --work $W --out "$OUT/rival-$2.json" >> "$OUT/progress.log" 2>&1 )
  log "row $1 $(el) s: $(python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['rows'][sys.argv[2]]['flashmoe']; \
print(r.get('decode_tok_s'), (r.get('n_cpu_moe_split') or {}).get('decode_plan'), r.get('error','')[-400:])" "$OUT/rival-$2.json" $1 2>&1 | tail -3)"
}
row 1 main-row1
row 3 main-row3
log "done $(el) s"
