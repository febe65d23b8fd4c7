#!/bin/bash
# Issue 9, a11: the decode-attention kernel (csrc/cuda/fm_attn.cu: the cluster merge, the first
# tile's loads before the PDL wait) against main's, in one H200 call. "before": a copy of this tree
# in /tmp/a11-before with main's _attn_cuda module ($BEFORE_SO) swapped in, everything else the same.
# Order: the kernel tests, the micro-timings (benchmarks/decode_attention.py) of both at n_ctx
# 128/552/2048/8192, then decode tok/s of both (flashmoe bench, rival row 6's settings: 32-layer
# Mixtral-shaped q4 store, --dense-quant q4, every expert in VRAM), the graph-decode tests last if
# time is left. The store is written meanwhile. Run from the tree's root after prep.sh; $OUT.
source "$(dirname "$0")/h200_common.sh"
cat /proc/loadavg >> "$OUT/progress.log"
STORE=/tmp/rival/mixtral-q4-32l
SYNTH=
[ -d "$STORE" ] || synth_store "$STORE" "$OUT/synth.log"
rm -rf /tmp/a11-before && mkdir -p /tmp/a11-before && tar --exclude=.device -cf - . | tar -C /tmp/a11-before -xf -
cp "$BEFORE_SO" /tmp/a11-before/flashmoe_plugin/
before() { (cd /tmp/a11-before && PYTHONPATH=/tmp/a11-before:/tmp/site "$@"); }
log "kernel tests"
timeout ${T_TEST:-50} python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_decode_attention.py > "$OUT/test_attn.log" 2>&1
log "kernel tests: $(tail -1 "$OUT/test_attn.log")"
MICRO="benchmarks/decode_attention.py --n-ctx 128 552 2048 8192 --splits 4 8 16 32 --no-torch"
timeout ${T_MICRO:-30} python3 $MICRO --out "$OUT/micro-after.json" > "$OUT/micro-after.log" 2>&1
log "micro after: $(grep -c n_ctx "$OUT/micro-after.log") rows"
before timeout ${T_MICRO:-30} python3 $MICRO --out "$OUT/micro-before.json" > "$OUT/micro-before.log" 2>&1
log "micro before: $(grep -c n_ctx "$OUT/micro-before.log") rows"
[ -n "$SYNTH" ] && wait $SYNTH
log "synth: $(tail -2 "$OUT/synth.log" 2>/dev/null | tr '\n' ' ')"
cat /proc/loadavg >> "$OUT/progress.log"
BENCH="bench $STORE --device cuda --dense-quant q4 --prompt-tokens 512 --tokens 32 --json --no-compute-bound --io-threads 8"
for side in after before; do
  left=$(( ${DEADLINE:-170} - SECONDS ))
  [ $left -gt 25 ] || { log "no time for bench $side"; continue; }
  run=(timeout $left python3 -c "import sys; from flashmoe_plugin.cli import main; sys.argv[0]='flashmoe'; main()" $BENCH)
  if [ $side = after ]; then "${run[@]}" > "$OUT/bench-$side.json" 2> "$OUT/bench-$side.log"
  else before "${run[@]}" > "$OUT/bench-$side.json" 2> "$OUT/bench-$side.log"; fi
  log "bench $side: $(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['decode_tok_s'], d.get('host_ms_per_token'))" "$OUT/bench-$side.json" 2>&1 | tail -1)"
done
if [ $(( ${DEADLINE:-170} - SECONDS )) -gt 8 ]; then
  timeout $(( ${DEADLINE:-170} - SECONDS )) python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_graph_decode.py \
    > "$OUT/test_graph.log" 2>&1
  log "graph tests: $(tail -1 "$OUT/test_graph.log")"
fi
log done
