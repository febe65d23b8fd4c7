#!/bin/bash
# h11's one H200 call (session 9, issue 10): rival.py's --n-cpu-moe rows (its exact flashmoe flags:
# --drop-caches --prompt-tokens 512 --tokens 32 --io-threads 8, one process a row) on this tree and
# on main's, with a /proc sampler beside each (benchmarks/h11_monitor.py: which threads hold the
# cores), and before them the C kernels on 4 KiB against huge pages (benchmarks/h11_huge_pages.py).
# usage (in .device/h11/src after `source prep.sh`): bash benchmarks/h200_h11.sh MAIN_TREE [LIMIT_S]
# MAIN_TREE: main's checkout with its compiled modules; everything lands in $OUT/h200-h11-call.json.
set -u
MINE=$PWD; BASE=$(cd "$1" && pwd); LIMIT=${2:-175}; T0=$(date +%s)
source benchmarks/h200_common.sh
el() { echo $(( $(date +%s) - T0 )); }
{ nproc; cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag
  grep MHz /proc/cpuinfo | sort | uniq -c; free -g; cat /proc/loadavg; } > "$OUT/host.txt" 2>&1
W=/tmp/rival
synth_store $W/mixtral-q4-32l "$OUT/synth.log"
wait $SYNTH; sync; log "synth and sync $(el) s: $(tail -2 "$OUT/synth.log" | head -1)"
[ "${THP:-1}" = 1 ] && { python3 benchmarks/h11_huge_pages.py $W/mixtral-q4-32l "$OUT/thp.json" 12 > "$OUT/thp.log" 2>&1; log "thp $(el) s"; }
python3 benchmarks/h11_merge.py "$OUT"
row() {  # TREE LABEL ROW: rival.py --rows ROW with TREE's code, the sampler beside it
  local left=$(( LIMIT - $(el) )); [ $left -lt 40 ] && { log "$2 skipped ($left s left)"; return; }
  ( cd "$1" && export PYTHONPATH="$1:/tmp/site" && \
    { python3 "$MINE/benchmarks/h11_monitor.py" "$OUT/mon-$2.jsonl" 0.25 & M=$!; \
      timeout $(( left - 3 )) python3 benchmarks/rival.py --src /nonexistent --engines flashmoe --rows $3 --work $W \
        --out "$OUT/rows-$2.json" 2>> "$OUT/progress.log"; kill $M; } )
  python3 benchmarks/h11_merge.py "$OUT"
  log "$2 $(el) s: $(python3 -c "import json,sys; d=json.load(open(sys.argv[1]))['rows'].get(sys.argv[2],{}).get('rows',{}); \
print({k: (r.get('flashmoe',{}).get('decode_tok_s'), (r.get('flashmoe',{}).get('n_cpu_moe_split') or {}).get('decode_plan'), \
r.get('flashmoe',{}).get('error','')[-300:]) for k, r in d.items()})" "$OUT/h200-h11-call.json" $2)"
}
for r in ${ROWS:-mine1 main1 mine3 main3}; do  # label: tree (mine/main) and row number
  row "$([ ${r%?} = mine ] && echo "$MINE" || echo "$BASE")" $r ${r: -1}
done
python3 benchmarks/h11_merge.py "$OUT"; log "done $(el) s"
