#!/bin/bash
# Issue 9's kernel work on one H200 (run from the repository root, built): the CUDA kernel tests
# (PDL included), benchmarks/pdl.py (PDL on/off) and the quick kernel bench. Results in $OUT:
# pdl.json, kernels-quick.json, logs beside them.
set -u
OUT=${OUT:-/tmp/fm-out}
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/progress.log"; }
log tests
timeout ${TEST_S:-100} python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_pdl.py tests/test_cuda_kernels.py \
  > "$OUT/tests.log" 2>&1
log "tests: $(tail -1 "$OUT/tests.log")"
log pdl
timeout ${PDL_S:-90} python3 benchmarks/pdl.py --json "$OUT/pdl.json" > /dev/null 2> "$OUT/pdl.log"
tail -n 40 "$OUT/pdl.log" | grep '^#' >> "$OUT/progress.log"
log "kernel bench (--quick)"
timeout ${KERNELS_S:-90} python3 -c 'from flashmoe_plugin.cli import main; main()' bench --kernels --device cuda --json --quick \
  > "$OUT/kernels-quick.json" 2> "$OUT/kernels-quick.log"
grep '^#' "$OUT/kernels-quick.log" >> "$OUT/progress.log"
log done
