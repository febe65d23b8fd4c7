#!/bin/bash
# c14's one H200 call (issue 10): fm_moe's one-pass decode (csrc/cpu/fm_moe1.c). In order, within
# LIMIT seconds: benchmarks/cpu_moe1.py alone on the machine (two Mixtral q4 experts, the two-phase
# path of main = set_moe1(0) against the one-pass path at 1 / 2 / 4 / 8 tasks a thread, interleaved
# in one process, with the host's read rate); then the 32-layer store and rival.py's rows 1 and 3
# (--n-cpu-moe 24 / 32) on this tree (one-pass on, the default).
# usage (in .device/c14/src after `source prep.sh`): bash benchmarks/h200_c14.sh [LIMIT_S]
set -u
LIMIT=${1:-172}; T0=$(date +%s)
source benchmarks/h200_common.sh
el() { echo $(( $(date +%s) - T0 )); }
{ nproc; cat /sys/kernel/mm/transparent_hugepage/enabled; free -g; cat /proc/loadavg; } >> "$OUT/progress.log" 2>&1
timeout 40 python3 benchmarks/cpu_moe1.py --json "$OUT/h200-c14-moe1.json" --label h200-c14 --total-gib 3 \
  --rounds 3 --passes 3 --tasks 0,1,2,4,8 > "$OUT/moe1.log" 2>&1
log "moe1 $(el) s: $(cat "$OUT/moe1.log" | tail -7)"
W=/tmp/rival
synth_store $W/mixtral-q4-32l "$OUT/synth.log"
wait $SYNTH; log "synth $(el) s: $(tail -2 "$OUT/synth.log" | head -1)"
row() {  # ROW LABEL
  local left=$(( LIMIT - $(el) )); [ $left -lt 45 ] && { log "row $1 skipped ($left s left)"; return; }
  timeout $(( left - 2 )) python3 benchmarks/rival.py --src /nonexistent --engines flashmoe --rows $1 --work $W \
    --out "$OUT/rival-$2.json" >> "$OUT/progress.log" 2>&1
  log "row $1 $(el) s: $(python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['rows'][sys.argv[2]]['flashmoe']; \
print(r.get('decode_tok_s'), (r.get('n_cpu_moe_split') or {}).get('decode_plan'), r.get('error','')[-400:])" "$OUT/rival-$2.json" $1 2>&1 | tail -3)"
  cp $W/flashmoe-h200-row$1.json "$OUT/" 2>/dev/null
}
row 1 c14-row1
row 3 c14-row3
log "done $(el) s"
