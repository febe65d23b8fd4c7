#!/bin/bash
# Issue 9, the decode-attention kernel (csrc/cuda/fm_attn.cu) in one H200 call (a9d): its CUDA
# tests, the micro-timing of the attention block (torch formula vs kernel, n_ctx 552 and 8192:
# benchmarks/decode_attention.py), rival row 6 (every expert in VRAM, --dense-quant q4) with this
# tree, the same row with the torch attention (FLASHMOE_ATTN=0) if time is left, then the
# graph-decode tests (last: a timeout then costs only coverage). The store is
# written meanwhile (CPU and disk). Run from the tree's root with the compiled modules importable
# (prep.sh); JSON and logs in $OUT. DEADLINE: seconds after the start by which the last step ends.
source "$(dirname "$0")/h200_common.sh"
cat /proc/loadavg >> "$OUT/progress.log"
STORE=/tmp/rival/mixtral-q4-32l
[ -d "$STORE" ] || (fm synth --like mixtral-8x7b --quant q4 "$STORE" > "$OUT/synth.log" 2>&1) &
SYNTH=$!
log "kernel tests"
timeout ${T_ATTN:-45} python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_decode_attention.py > "$OUT/test_attn.log" 2>&1
log "kernel tests: $(tail -1 "$OUT/test_attn.log")"
log micro
timeout ${T_MICRO:-45} python3 benchmarks/decode_attention.py --out "$OUT/micro.json" > "$OUT/micro.log" 2>&1
log "micro done: $(tail -c 300 "$OUT/micro.log" | tr '\n' ' ')"
wait $SYNTH
log "synth: $(tail -1 "$OUT/synth.log" 2>/dev/null)"
cat /proc/loadavg >> "$OUT/progress.log"
timeout ${T_RIVAL:-70} python3 benchmarks/rival.py --src x --machine h200 --engines flashmoe --rows 6 --work /tmp/rival \
  --out "$OUT/rival.json" > "$OUT/rival.log" 2>&1
cp /tmp/rival/flashmoe-h200-row6.json "$OUT/" 2>/dev/null
log "rival: $(tail -2 "$OUT/rival.log" | tr '\n' ' ')"
if [ "${RIVAL_OFF:-1}" = 1 ] && [ $(( ${DEADLINE:-170} - SECONDS )) -gt 58 ]; then  # main's attention, same call
  FLASHMOE_ATTN=0 timeout $(( ${DEADLINE:-170} - SECONDS )) python3 benchmarks/rival.py --src x --machine h200 \
    --engines flashmoe --rows 6 --work /tmp/rival --out "$OUT/rival-off.json" > "$OUT/rival-off.log" 2>&1
  cp /tmp/rival/flashmoe-h200-row6.json "$OUT/flashmoe-h200-row6-off.json" 2>/dev/null
  log "rival, FLASHMOE_ATTN=0: $(tail -2 "$OUT/rival-off.log" | tr '\n' ' ')"
fi
if [ $(( ${DEADLINE:-170} - SECONDS )) -gt 5 ]; then
  timeout $(( ${DEADLINE:-170} - SECONDS )) python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_graph_decode.py \
    > "$OUT/test_graph.log" 2>&1
  log "graph tests: $(tail -1 "$OUT/test_graph.log")"
fi
log done
