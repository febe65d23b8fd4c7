#!/bin/bash
# Issue 9's prefill checks on an H200 in one call: the CUDA build, the prefill kernel sweep (every
# q4 variant against dequantize + cuBLAS) and the prefill CUDA tests while the 32-layer
# Mixtral-shaped q4 store is written, then `flashmoe bench` on it (bf16 and q8 dense part: the
# warm prefill before and after torch.profiler ran) and benchmarks/prefill_profile.py (where the
# prefill's time goes, the attention before and after issue 9's change).
# usage (repository root on the GPU machine; the wheels the image lacks in WHL): bash benchmarks/h200_prefill.sh OUTDIR
# The bench runs keep the page cache (bench's evictions turned off in this harness only): its cold
# prefill then reads the store from RAM, not the disk (~20 s of device time each); warm figures
# do not depend on it.
set -u
OUT=${1:-/tmp/out}; mkdir -p "$OUT"; t0=$(date +%s); LOG=$OUT/log.txt
el() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$LOG"; }
[ -n "${WHL:-}" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHL/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
FLASHMOE_CUDA=1 FLASHMOE_CUDA_ARCH="-gencode arch=compute_90,code=sm_90" python3 setup.py -q build_ext --inplace -j 16 \
  > /tmp/build.log 2>&1 && python3 setup.py -q egg_info >> /tmp/build.log 2>&1 || { tail -40 /tmp/build.log | tee -a "$LOG"; exit 1; }
el "built: $(python3 -c 'import flashmoe_plugin._prefill_cuda as g, flashmoe_plugin._kernels_cuda; print(g.VARIANTS)' 2>&1 | tail -1)"
fm() { python3 -c "import sys; from flashmoe_plugin.cli import main; sys.argv[0] = 'flashmoe'; main()" "$@"; }
STORE=${STORE:-/tmp/m32}
(fm synth --like mixtral-8x7b --quant q4 "$STORE" > /tmp/synth.log 2>&1; el "synth rc $?") &
python3 benchmarks/prefill_profile.py --kernels > "$OUT/kernels.json" 2>> "$LOG"; el "kernel sweep rc $?"
timeout ${TEST_S:-90} python3 -m pytest -q -p no:cacheprovider -rf tests/test_cuda_prefill.py > /tmp/pytest.log 2>&1
el "tests: $(tail -1 /tmp/pytest.log)"; grep -E "^(FAILED|ERROR)|Error|assert" /tmp/pytest.log | head -20 >> "$LOG"
wait
bench() {  # $1 name, rest: bench options
  local name=$1; shift
  python3 -c "import sys; import flashmoe_plugin.bench.store as s; s._evict = lambda reader, fids: 'kept (harness)'
from flashmoe_plugin.cli import main; sys.argv[0] = 'flashmoe'; main()" bench "$STORE" --device cuda --json \
    --prompt-tokens 512 --tokens 32 --no-compute-bound --io-threads 8 "$@" > "$OUT/bench-$name.json" 2> /tmp/bench-$name.err
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], {k: d.get(k) for k in ('prefill_warm_tok_s',
    'prefill_warm_tok_s_all', 'prefill_warm_after_profiler_tok_s', 'ttft_s', 'decode_tok_s', 'dense_quant')})" \
    "$OUT/bench-$name.json" "$name" >> "$LOG" 2>&1 || tail -5 /tmp/bench-$name.err >> "$LOG"
  el "bench $name"
}
bench bf16
bench q8 --dense-quant q8
python3 benchmarks/prefill_profile.py "$STORE" --reps 3 > "$OUT/profile32.json" 2>> "$LOG"; el "profile rc $?"
