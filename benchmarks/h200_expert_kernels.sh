#!/bin/bash
# Issue 9 scope 4 on one H200: the expert kernels of this tree ("after") against another CUDA
# source ("before", $BEFORE_CU: e.g. main's csrc/cuda/fm_kernels.cu), built side by side and
# measured in the same call (benchmarks/expert_kernels.py; FMC_KERNELS_SO swaps the module), then
# the CUDA kernel tests on this tree; with DECODE=1 also decode tok/s on an 8-layer Mixtral-shaped
# synth store for each of DECODE_RUNS (default "before after"; "after:N" = this tree with the ring
# depth knob at N). KERNELS=0 skips the kernel bench, TESTS=none the tests; INPLACE=1 builds with
# `setup.py build_ext --inplace -j` instead of pip (faster). Run from this tree's root. Results in $OUT.
set -u
OUT=${OUT:-/tmp/fm-out}
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/progress.log"; }
export FLASHMOE_CUDA=1 FLASHMOE_CUDA_ARCH="-gencode arch=compute_90,code=sm_90" PYTHONUNBUFFERED=1
log build
if [ "${INPLACE:-0}" = 1 ]; then
  python3 setup.py build_ext --inplace -j 16 > "$OUT/build.log" 2>&1 &
else
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 &
fi
if [ -n "${BEFORE_CU:-}" ]; then
  rm -rf /tmp/before && mkdir /tmp/before && tar --exclude=.git --exclude=build -cf - . | tar -C /tmp/before -xf - \
    && cp "$BEFORE_CU" /tmp/before/csrc/cuda/fm_kernels.cu && cp "$(dirname "$BEFORE_CU")/fm_cuda.h" /tmp/before/csrc/cuda/ \
    && (cd /tmp/before && python3 setup.py build_ext --inplace > "$OUT/build-before.log" 2>&1) &
fi
wait
BEFORE_SO=$(ls /tmp/before/flashmoe_plugin/_kernels_cuda*.so 2>/dev/null | head -1)
log "built (before: ${BEFORE_SO:-none})"
if [ "${DECODE:-0}" = 1 ]; then
  (python3 -c 'from flashmoe_plugin.cli import main; main()' synth --like mixtral-8x7b --quant q4 --layers 8 /tmp/m8 \
    > "$OUT/synth.log" 2>&1; echo synth-done >> "$OUT/synth.log") &
fi
for v in before after; do
  [ "${KERNELS:-1}" = 1 ] || break
  so=""; [ $v = before ] && { [ -n "$BEFORE_SO" ] || continue; so=$BEFORE_SO; }
  log "kernels $v"
  FMC_KERNELS_SO=$so timeout ${KERNELS_S:-80} python3 benchmarks/expert_kernels.py --label $v $([ $v = after ] && echo "${STAGES_ARG:-}") --json "$OUT/kernels-$v.json" \
    2>&1 | grep -v Warning | tee -a "$OUT/progress.log" | tail -20
done
[ "${TESTS:-}" = none ] || { log tests
timeout ${TEST_S:-120} python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/test_cuda_ring_depth.py tests/test_cuda_kernels.py tests/test_cuda_pdl.py} \
  > "$OUT/tests.log" 2>&1
log "tests: $(tail -1 "$OUT/tests.log")"; }
if [ "${DECODE:-0}" = 1 ]; then
  wait
  for v in ${DECODE_RUNS:-before after}; do
    so=""; stages=""
    case $v in before) [ -n "$BEFORE_SO" ] || continue; so=$BEFORE_SO ;; after:*) stages=${v#after:} ;; esac
    log "decode $v"
    FMC_KERNELS_SO=$so FMC_STAGES=$stages timeout ${DECODE_S:-120} python3 -c 'import sys; sys.path.insert(0, "benchmarks"); import expert_kernels as k; k.swap(); from flashmoe_plugin.cli import main; main()' \
      bench /tmp/m8 --device cuda --dense-quant q8 --json ${DECODE_ARGS:-} > "$OUT/decode-${v/:/-}.json" 2> "$OUT/decode-${v/:/-}.log"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: r.get(k) for k in ('decode_tok_s','kernel_bound_tok_s','prefill_tok_s','host_ms_per_token','decode_graph')})" \
      "$OUT/decode-${v/:/-}.json" 2>&1 | tee -a "$OUT/progress.log"
  done
fi
