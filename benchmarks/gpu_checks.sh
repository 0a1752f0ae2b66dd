#!/usr/bin/env bash
# One device call's worth of GPU work, in priority order, each step time-limited; logs under $OUT (or ./out).
# Usage on the lent GPU machine:  bash benchmarks/gpu_checks.sh [tests|decode|kernels|all]
set -u
export PYTHONUNBUFFERED=1
export MOBA_DECODE_KERNEL=1     # the decode kernel on CUDA (off by default until this run passes)
OUT=${OUT:-out}; mkdir -p "$OUT"
what=${1:-all}
if [[ $what == tests || $what == all ]]; then
  # the compiled kernels against the fp64 reference (about 3.5 minutes, mostly Triton compilation)
  timeout 280 python3 -m pytest -q -x tests/test_gpu.py tests/test_triton.py tests/test_decode.py \
    tests/test_compile.py -p no:cacheprovider > "$OUT/tests.log" 2>&1; tail -3 "$OUT/tests.log"
fi
if [[ $what == decode || $what == all ]]; then
  timeout 200 python3 benchmarks/bench_decode.py --json "$OUT/decode.json" > "$OUT/decode.log" 2>&1
  grep "^|" "$OUT/decode.log"; tail -2 "$OUT/decode.log"
fi
if [[ $what == kernels || $what == all ]]; then
  timeout 280 python3 benchmarks/bench_kernels.py --cases fwd8k,fb32k,fwd1m --json "$OUT/kernels.json" \
    > "$OUT/kernels.log" 2>&1
  grep "^|" "$OUT/kernels.log"; tail -2 "$OUT/kernels.log"
fi
