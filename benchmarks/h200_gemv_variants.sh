#!/bin/bash
# Issue 9 (k9c), the second H200 call: the GEMV's and the expert kernel's CUDA tests (TESTS); the
# dense shapes of a Mixtral decode token (q/k/v stacked, o, k/v; FORMATS, GEMV_T) with every gemv
# kernel (1: a block per item, main's; 2, 3: the persistent grid at 2 / 3 blocks per SM) and auto;
# then decode runs of the 32-layer q4 store (DEC_ARGS) under process-wide knobs (RUNS: auto, main's
# GEMV kernel, the persistent grid at 2 blocks per SM, the MoE's two launches, its phase-B L2
# prefetch of 64 KiB per block before the grid barrier, q8 dense) and rival.py's row 6 (RIVAL=1).
# Run as TESTS="tests/test_cuda_gemv.py tests/test_cuda_kernels.py::test_moe_qwen35_layer_shape"
# FORMATS=q4 GEMV_T=1 RUNS=q4-moe-two DEC_ARGS="--prompt-tokens 512 --tokens 32" RIVAL=0 (the
# device time left); the kernel knob then numbered 5 kernels, see results/h200-k9c-call2.json.
source "$(dirname "$0")/h200_common.sh"
ST=/tmp/rival/mixtral-q4-32l
synth_store $ST /tmp/synth.log
log tests
timeout ${TEST_S:-60} python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/test_cuda_gemv.py tests/test_cuda_kernels.py} \
  > "$OUT/tests.log" 2>&1
log "tests: $(tail -1 "$OUT/tests.log")"
log "dense gemv"
timeout ${GEMV_S:-40} python3 benchmarks/dense_gemv.py --total-gib 0.3 --tokens ${GEMV_T:-1,4} --kernels 1,2,3 --shapes qkv,o,kv --formats ${FORMATS:-q8,q4} \
  --json "$OUT/dense-gemv.json" 2>&1 | grep -v Warning | tee -a "$OUT/progress.log" | tail -3
wait $SYNTH
log "synth: $(tail -2 /tmp/synth.log | tr '\n' ' ')"
# name, knobs (python statements on K = _kernels_cuda), dense quant
run() {
  log "decode $1"
  timeout ${DEC_S:-35} python3 -c "import sys; import flashmoe_plugin._kernels_cuda as K; $2; \
from flashmoe_plugin.cli import main; sys.argv[0]='flashmoe'; main()" bench $ST --json ${DEC_ARGS:---prompt-tokens 16 --tokens 64} \
    --no-compute-bound --io-threads 8 --device cuda --dense-quant $3 > "$OUT/decode-$1.json" 2> "$OUT/decode-$1.log"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(round(r['decode_tok_s'],1), round(r['host_ms_per_token'],2), \
[(n[:40], round(u)) for n, c, u in r['kernel_us_by_name'][:3]])" "$OUT/decode-$1.json" 2>&1 | tail -1 | tee -a "$OUT/progress.log"
}
declare -A KNOBS=([q4-auto]="pass" [q4-main-kernel]="K.gemv_tune('kernel', 1)" [q4-persist2]="K.gemv_tune('persist', 2)"
  [q4-moe-two]="K.tune('auto_mode', 1)" [q4-moe-prefetch]="K.tune('prefetch', 65536)" [q8-auto]="pass")
for r in ${RUNS:-q4-auto q4-main-kernel q4-persist2 q4-moe-two q4-moe-prefetch q8-auto}; do run $r "${KNOBS[$r]}" ${r%%-*}; done
if [ "${RIVAL:-1}" = 1 ]; then
  log "rival row 6"
  timeout ${RIVAL_S:-50} python3 benchmarks/rival.py --src x --machine h200 --engines flashmoe --rows 6 --work /tmp/rival \
    --out "$OUT/rival.json" > "$OUT/rival.log" 2>&1
  log "rival: $(grep -o '"decode_tok_s": [0-9.]*' "$OUT/rival.json" | tr '\n' ' ')"
fi
