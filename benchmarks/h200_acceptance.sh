#!/bin/bash
# The merged tree's GPU checks in one call on an H200 (the lead's acceptance run): the wheels the
# image lacks, the CUDA build, every CUDA test, the GGUF CUDA twin, then `flashmoe bench` on a
# full Mixtral-8x7B-shaped q4 store (all experts in VRAM; hybrid rows) while time remains.
# usage (repository root on the GPU machine, .whl carried): bash benchmarks/h200_acceptance.sh OUTDIR
# STORE=DIR: where the store is written (default /tmp/m32); ROWS=0 skips the bench rows (benchmarks/rival.py
# measures them beside llama.cpp in a following call); TESTS="files" overrides the CUDA test files.
set -u
OUT=${1:-/tmp/out}; mkdir -p "$OUT"; t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/progress.log"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
FLASHMOE_CUDA=1 FLASHMOE_CUDA_ARCH="-gencode arch=compute_90,code=sm_90" MAX_JOBS=16 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
el built
fm() { python3 -c "import sys; from flashmoe_plugin.cli import main; sys.argv[0] = 'flashmoe'; main()" "$@"; }
STORE=${STORE:-/tmp/m32}
(fm synth --like mixtral-8x7b --quant q4 "$STORE" > "$OUT/synth.log" 2>&1; el synth) &
TESTS=${TESTS:-tests/test_cuda_graph_decode.py tests/test_cuda_pager.py tests/test_cuda_kernels.py tests/test_hybrid.py tests/test_hybrid_cpu_gpu.py tests/test_cuda_prefill.py}
timeout ${TEST_S:-240} python3 -m pytest -q -p no:cacheprovider -rf $TESTS -k "${K:-cuda or gpu or n_cpu_moe or host_compute}" \
  > "$OUT/pytest.log" 2>&1; el "tests: $(tail -1 "$OUT/pytest.log")"
timeout 60 python3 benchmarks/gguf_cuda_check.py "$OUT/gguf-cuda.json" > "$OUT/gguf-cuda.log" 2>&1; el "gguf cuda: rc $?"
wait
[ "${ROWS:-1}" = 0 ] && exit 0
for row in "vram:" "ncpumoe24:--n-cpu-moe 24 --no-compute-bound" "ncpumoe32:--n-cpu-moe 32 --no-compute-bound"; do
  name=h200-merged-${row%%:*}; args=${row#*:}
  timeout ${BENCH_S:-110} bash -c "$(declare -f fm); fm bench $STORE --device cuda --json --prompt-tokens 512 --tokens 32 \
    --io-threads 8 $args" > "$OUT/$name.json" 2> "$OUT/$name.err"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], {k: d.get(k) for k in ('decode_tok_s', \
    'prefill_tok_s', 'prefill_warm_tok_s', 'compute_bound_tok_s', 'compute_bound_prefill_tok_s', 'kernel_bound_tok_s', \
    'decode_graph', 'host_ms_per_token', 'kernels_per_token')})" "$OUT/$name.json" "$name" | tee -a "$OUT/progress.log" \
    || tail -3 "$OUT/$name.err"
  el "$name"
done
