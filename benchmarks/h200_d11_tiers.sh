#!/bin/bash
# d11's H200 call (issue 10, row 2: dynamic tiers): `--vram-budget 8G --ram-budget 24G` on this
# tree and on main's (the files this branch changes, main's versions in $MAIN_FILES, over a copy
# of this tree: same compiled modules), and the static `--n-cpu-moe 24` once for reference, in one
# call, one after the other (RUNS: which, in order; row2-up: this tree with copies up ahead beside the CPU's share). Each run is cut short by the call's deadline (DEADLINE seconds).
# JSON to $OUT/h200-d11-*.json. Run from the tree's root, after prep.sh.
source benchmarks/h200_common.sh
T0=$(date +%s); DEADLINE=${DEADLINE:-170}
ST=${ST:-/tmp/rival/mixtral-q4-32l}
DEV=${DEV:-"--device cuda"}
ROW2=${ROW2:-"--vram-budget 8G --ram-budget 24G"}
STATIC=${STATIC:-"--n-cpu-moe 24"}
MAIN_FILES=${MAIN_FILES:-.abmain}
COMMON="--json --prompt-tokens ${PROMPT:-512} --tokens 32 --no-compute-bound --io-threads 8 $DEV"
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
bench() {  # bench NAME TREE PRE ARGS...: one flashmoe bench within the time left (PRE: python run first)
  local name=$1 tree=$2 pre=$3; shift 3
  local t; t=$(left)
  [ "$t" -gt 5 ] || { log "$name: no time left"; return; }
  log "$name ($t s left): $* (load $(cut -d' ' -f1-3 /proc/loadavg))"
  (cd "$tree" && PYTHONPATH=$tree:/tmp/site timeout "$t" python3 -c \
    "$pre
import sys; from flashmoe_plugin.cli import main; sys.argv[0]='flashmoe'; main()" bench "$ST" $COMMON "$@") \
    > "$OUT/h200-d11-$name.json" 2> "$OUT/$name.err"
  log "$name: rc $? $(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('decode', d['decode_tok_s'], 'tiers', d.get('tiers'))" "$OUT/h200-d11-$name.json" 2>&1 | tail -c 600)"
}
if [ ! -f "$ST/manifest.json" ]; then
  log "synth $ST"; synth_store "$ST" /tmp/synth.log; wait "$SYNTH"; tail -2 /tmp/synth.log
fi
ME=$PWD
MAIN=/tmp/d11-main; rm -rf "$MAIN"; cp -r "$ME" "$MAIN"; cp -r "$MAIN_FILES"/. "$MAIN"/
UP="from flashmoe_plugin.runtime.host_compute import HostCompute; HostCompute.prefetch_up = True"
for run in ${RUNS:-row2 static24 main-row2}; do
  case $run in
    row2) bench row2 "$ME" "" $ROW2 --drop-caches ;;
    row2-up) bench row2-up "$ME" "$UP" $ROW2 ;;  # A/B: copies up ahead beside the CPU's share
    static24) bench static24 "$ME" "" $STATIC ;;
    main-row2) bench main-row2 "$MAIN" "" $ROW2 ;;
  esac
done
t=$(left)
if [ "$t" -gt 30 ] && [ -z "${NO_TESTS:-}" ]; then  # the GPU tests of the pager and tiered step, in the time left
  log "GPU tests ($t s left)"
  timeout "$t" python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_pager.py tests/test_cuda_graph_decode.py \
    > "$OUT/gpu-tests.log" 2>&1; log "GPU tests: rc $? $(tail -1 "$OUT/gpu-tests.log")"
fi
log "done in $(( $(date +%s) - T0 )) s"
