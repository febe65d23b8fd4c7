#!/bin/bash
# Issue 9's kernel work on one H200 (run from the repository root, built): the CUDA kernel tests
# (split-K and PDL included), benchmarks/split_k.py (split:pdl settings) and the quick kernel
# bench. Results in $OUT: split-k.json, kernels-quick.json, logs beside them.
set -u
OUT=${OUT:-/tmp/fm-out}
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/progress.log"; }
log tests
timeout ${TEST_S:-100} python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_split.py tests/test_cuda_kernels.py \
  > "$OUT/tests.log" 2>&1
log "tests: $(tail -1 "$OUT/tests.log")"
log split_k
timeout ${SPLIT_S:-90} python3 benchmarks/split_k.py --json "$OUT/split-k.json" > /dev/null 2> "$OUT/split-k.log"
tail -n 40 "$OUT/split-k.log" | grep '^#' >> "$OUT/progress.log"
log "kernel bench (--quick)"
timeout ${KERNELS_S:-90} python3 -c 'from flashmoe_plugin.cli import main; main()' bench --kernels --device cuda --json --quick \
  > "$OUT/kernels-quick.json" 2> "$OUT/kernels-quick.log"
grep '^#' "$OUT/kernels-quick.log" >> "$OUT/progress.log"
log done
