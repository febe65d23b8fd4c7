#!/bin/bash
# Issue 9, a decode layer's non-expert kernels (kernels/decode_fuse.py: the attention norm inside
# the q/k/v GEMV, the routing in one kernel; the cooperative expert kernel's early trigger of the
# next launch) on one H200, one call: the CUDA tests of the folds, then benchmarks/decode_fuse_ab.py
# on the 32-layer Mixtral-shaped q4 store (main's step = folds 0, trigger 0, in the same process),
# then `flashmoe bench` with this tree's defaults. From the shipped tree:
#   cd .device/g11/src && source prep.sh && OUT=$OUT bash benchmarks/h200_g11.sh
source benchmarks/h200_common.sh
cat /proc/loadavg >> "$OUT/progress.log"
log start
synth_store /tmp/st "$OUT/synth.log"
python3 -m pytest -q -x tests/test_cuda_decode_fuse.py -k "not graph" -p no:cacheprovider > "$OUT/tests-kernels.log" 2>&1
log "kernel tests rc=$? $(tail -1 "$OUT/tests-kernels.log")"
wait $SYNTH
log "synth: $(tail -2 "$OUT/synth.log" | head -1)"
python3 benchmarks/decode_fuse_ab.py /tmp/st --tokens 64 --rounds 2 > "$OUT/h200-g11-decode-fuse-ab.json" 2> "$OUT/ab.log"
log "ab rc=$?"
python3 -m pytest -q -x tests/test_cuda_decode_fuse.py -k graph -p no:cacheprovider > "$OUT/tests-graph.log" 2>&1
log "graph tests rc=$? $(tail -1 "$OUT/tests-graph.log")"
fm bench /tmp/st --json --prompt-tokens 512 --tokens 32 --device cuda --dense-quant q4 --io-threads 8 \
  > "$OUT/h200-g11-bench.json" 2> "$OUT/bench.log"
log "bench rc=$?"
