#!/bin/bash
# Issue 9 (k9c), the persistent decode GEMV in one H200 call, from a tree shipped with its modules
# built (/work/helpers/ship): the GEMV's CUDA tests; benchmarks/dense_gemv.py with main's kernel
# (gemv_tune kernel 1) beside the persistent grid (the default, 2 and 4 chunks per batch, grid
# caps); the 32-layer Mixtral-shaped q4 store synthesized meanwhile, then rival.py's rows 6 and 4
# (q4 / q8 dense, every expert in VRAM) and row 6's command once more with main's kernel.
source "$(dirname "$0")/h200_common.sh"
ST=/tmp/rival/mixtral-q4-32l
synth_store $ST /tmp/synth.log
log tests
timeout ${TEST_S:-60} python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/test_cuda_gemv.py tests/test_cuda_dense_quant.py} \
  > "$OUT/tests.log" 2>&1
log "tests: $(tail -1 "$OUT/tests.log")"
log "dense gemv"
timeout ${GEMV_S:-80} python3 benchmarks/dense_gemv.py --total-gib 0.3 --tokens 1,4 --kernels 1,3 --grids 132,198 \
  --json "$OUT/dense-gemv.json" 2>&1 | grep -v Warning | tee -a "$OUT/progress.log" | tail -5
wait $SYNTH
log "synth: $(tail -2 /tmp/synth.log | tr '\n' ' ')"
timeout ${RIVAL_S:-110} python3 benchmarks/rival.py --src x --machine h200 --engines flashmoe --rows ${ROWS:-6,4} --work /tmp/rival \
  --out "$OUT/rival.json" > "$OUT/rival.log" 2>&1
log "rival: $(grep -o '"decode_tok_s": [0-9.]*' "$OUT/rival.json" | tr '\n' ' ')"
log "row 6 with main's GEMV kernel"
timeout ${MAIN_S:-55} python3 -c "import sys; import flashmoe_plugin._kernels_cuda as K; K.gemv_tune('kernel', 1); \
from flashmoe_plugin.cli import main; sys.argv[0]='flashmoe'; main()" bench $ST --json --prompt-tokens 512 --tokens 32 \
  --no-compute-bound --io-threads 8 --device cuda --dense-quant q4 > "$OUT/row6-main-kernel.json" 2> "$OUT/row6-main-kernel.log"
log "main kernel: $(grep -o '"decode_tok_s": [0-9.]*' "$OUT/row6-main-kernel.json")"
