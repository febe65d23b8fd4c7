#!/bin/bash
# Issue 9, s12: the decode loop pipelined by one token (runtime/pipelined.py) on one H200, one call:
# the GPU tests of the pipelined loop (beside the synth of the 32-layer Mixtral-shaped q4 store),
# then benchmarks/pipelined_ab.py (main's loop and the pipelined one in the same process, rows 6
# and 0's dense parts: --dense-quant q4 and the default q8), then the graph-decode tests (mixtral).
#   cd .device/s12/src && source prep.sh && OUT=$OUT bash benchmarks/h200_s12.sh
source benchmarks/h200_common.sh
export PYTHONUNBUFFERED=1
cat /proc/loadavg >> "$OUT/progress.log"
log start
synth_store /tmp/st "$OUT/synth.log"
python3 -m pytest -q -x tests/test_cuda_pipelined.py -p no:cacheprovider > "$OUT/tests-pipelined.log" 2>&1
log "pipelined tests rc=$? $(tail -1 "$OUT/tests-pipelined.log")"
wait $SYNTH
log "synth: $(tail -2 "$OUT/synth.log" | head -1)"
python3 benchmarks/pipelined_ab.py /tmp/st --dense-quant q4 auto --tokens 32 --rounds 2 \
  > "$OUT/h200-s12-pipelined-ab.jsonl" 2> "$OUT/ab.log"
log "ab rc=$?"
python3 -m pytest -q -x tests/test_cuda_graph_decode.py -k "mixtral or default" -p no:cacheprovider > "$OUT/tests-graph.log" 2>&1
log "graph tests rc=$? $(tail -1 "$OUT/tests-graph.log")"
