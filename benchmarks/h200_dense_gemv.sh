#!/bin/bash
# Issue 9, the dense GEMVs of a decode token, in one H200 call (run from this tree's root): build in
# place; the dense shapes, fmc_linear against the decode GEMV of the same build
# (benchmarks/dense_gemv.py); an 8-layer Mixtral-shaped q4 store synthesized meanwhile, then
# `flashmoe bench` decode with FLASHMOE_GEMV=0 (before: fmc_linear per part + cat) and 1 (after)
# at --dense-quant q8 and q4; then the CUDA tests of the GEMV. Results in $OUT (5 files).
set -u
OUT=${OUT:-/tmp/fm-out}
mkdir -p "$OUT" /tmp/dec
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/progress.log"; }
export FLASHMOE_CUDA=1 FLASHMOE_CUDA_ARCH="-gencode arch=compute_90,code=sm_90" PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
fm() { python3 -c 'from flashmoe_plugin.cli import main; main()' "$@"; }
log build
python3 setup.py build_ext --inplace -j 16 > "$OUT/build.log" 2>&1 || { log "build failed"; tail -40 "$OUT/build.log"; exit 1; }
log built
(fm synth --like mixtral-8x7b --quant q4 --layers ${LAYERS:-8} /tmp/m8 > /tmp/synth.log 2>&1; echo synth-done >> /tmp/synth.log) &
SYNTH=$!
log "dense gemv"
timeout ${GEMV_S:-80} python3 benchmarks/dense_gemv.py --total-gib 0.5 --tokens 1,4 --splits ${SPLITS:-1,2,4,8} \
  --json "$OUT/dense-gemv.json" 2>&1 | grep -v Warning | tee -a "$OUT/progress.log" | tail -60
wait $SYNTH
log "synth: $(tail -2 /tmp/synth.log | tr '\n' ' ')"
for dq in ${DQ:-q8 q4}; do
  for g in 0 1; do
    log "decode dense $dq gemv $g"
    FLASHMOE_GEMV=$g timeout ${DECODE_S:-60} python3 -c 'from flashmoe_plugin.cli import main; main()' bench /tmp/m8 \
      --device cuda --dense-quant $dq --tokens ${TOKENS:-128} --prompt-tokens 64 --json > /tmp/dec/$dq-gemv$g.json 2> /tmp/dec/$dq-gemv$g.log
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: r.get(k) for k in ('decode_tok_s','kernel_bound_tok_s','host_ms_per_token','kernels_per_token','decode_graph')})" \
      /tmp/dec/$dq-gemv$g.json 2>&1 | tail -1 | tee -a "$OUT/progress.log"
  done
done
python3 - "$OUT/decode.json" /tmp/dec/*.json <<'P'
import json, os, sys
out = {}
for f in sys.argv[2:]:
    try:
        out[os.path.basename(f)[:-5]] = json.load(open(f))
    except Exception as e:
        out[os.path.basename(f)[:-5]] = {"error": repr(e), "log_tail": open(f[:-5] + ".log").read()[-3000:]}
json.dump(out, open(sys.argv[1], "w"), indent=1)
P
log tests
timeout ${TEST_S:-70} python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/test_cuda_gemv.py tests/test_cuda_kernels.py tests/test_cuda_dense_quant.py} \
  > "$OUT/tests.log" 2>&1
log "tests: $(tail -1 "$OUT/tests.log")"
