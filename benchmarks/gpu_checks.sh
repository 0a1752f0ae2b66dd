#!/usr/bin/env bash
# One device call's worth of GPU work, in priority order, each step time-limited; logs under $OUT (or ./out).
# Usage on the lent GPU machine:  bash benchmarks/gpu_checks.sh [tests|decode|tune|kernels|gluon|persist|own|wstests|pf|ab|all]...
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
for what in "${@:-all}"; do
if [[ $what == tests || $what == all ]]; then
  # the compiled kernels against the fp64 reference; the files run side by side (Triton compilation is
  # most of the time and uses one CPU core per process)
  pids=()
  for f in test_gpu test_triton test_decode test_compile test_hf; do
    timeout 300 python3 -m pytest -q -x tests/$f.py -p no:cacheprovider --durations=5 > "$OUT/tests_$f.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait $p; done
  for f in test_gpu test_triton test_decode test_compile test_hf; do
    echo "$f: $(grep -E '(passed|failed|error)' "$OUT/tests_$f.log" | tail -1)"
  done
fi
if [[ $what == decode || $what == all ]]; then
  timeout 200 python3 benchmarks/bench_decode.py --profile --json "$OUT/decode.json" > "$OUT/decode.log" 2>&1
  grep -E "^\||host|^ +[0-9.]+ ms" "$OUT/decode.log"; tail -2 "$OUT/decode.log"
fi
if [[ $what == gluon ]]; then
  # the Gluon dK/dV kernel (on by default on sm_90; MOBA_DKDV_GLUON=0 is the Triton one): its GPU tests, then
  # fb32k/fb8k kernel times of the Triton kernel and of the Gluon one with rings of 3 and 4
  timeout 240 python3 -m pytest -q -x tests/test_gpu.py -k gluon -p no:cacheprovider > "$OUT/tests_gluon.log" 2>&1
  tail -3 "$OUT/tests_gluon.log"
  for g in "0 3" "1 3" "1 4"; do set -- $g
    MOBA_DKDV_GLUON=$1 MOBA_GLUON_NS=$2 timeout 100 python3 benchmarks/bench_kernels.py --cases fb32k,fb8k --dense '' \
      --profile > "$OUT/gluon_$1_$2.log" 2>&1
    echo "gluon=$1 NS=$2"; grep -E "GPU kernels|_dkdv" "$OUT/gluon_$1_$2.log"
  done
fi
if [[ $what == persist ]]; then
  # the persistent Gluon forward (PERFLOG 40, opt-in): its GPU tests (both forms against the reference, and
  # bitwise equal to each other; compiling them takes minutes on a fresh machine), then fwd8k/fwd32k/fb32k A/B
  timeout 400 python3 -m pytest -q -x tests/test_gpu.py -k gluon_fwd_ws -p no:cacheprovider > "$OUT/tests_persist.log" 2>&1
  tail -3 "$OUT/tests_persist.log"
  for p in 0 1; do
    MOBA_GLUON_WS_PERSIST=$p timeout 100 python3 benchmarks/bench_kernels.py --cases fwd8k,fwd32k,fb32k --dense cudnn \
      --graph --profile --json "$OUT/persist_$p.json" > "$OUT/persist_$p.log" 2>&1
    echo "persist=$p"; grep -E "^\| f|sparse_fwd_ws|GPU kernels" "$OUT/persist_$p.log"
  done
fi
if [[ $what == own ]]; then
  # the own block by the Gluon kernel (PERFLOG 41-42, opt-in) and both Gluon forward forms after the loop-count fix:
  # their tests side by side (compiling is most of it, one core each), then A/B of the own-block kernel
  pids=()
  for k in "gluon_own" "gluon_fwd_ws and persistent_own" "gluon_fwd_ws and persistent and not own" \
           "gluon_fwd_ws and per_tile"; do
    timeout 300 python3 -m pytest -q -x tests/test_gpu.py -k "$k" -p no:cacheprovider > "$OUT/tests_own_${#pids[@]}.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait $p; done
  for i in 0 1 2 3; do echo "tests $i: $(tail -1 "$OUT/tests_own_$i.log")"; done
  for o in 0 1; do
    MOBA_GLUON_OWN=$o timeout 120 python3 benchmarks/bench_kernels.py --cases fwd8k,fwd32k,fb32k --dense cudnn \
      --graph --profile --json "$OUT/own_$o.json" > "$OUT/own_$o.log" 2>&1
    MOBA_GLUON_OWN=$o timeout 90 python3 benchmarks/bench_kernels.py --cases fwd1m --dense '' --profile \
      --json "$OUT/own1m_$o.json" > "$OUT/own1m_$o.log" 2>&1
    echo "own=$o"; grep -hE "^\| f|own_fwd|sparse_fwd_ws|_block_means|GPU kernels" "$OUT/own_$o.log" "$OUT/own1m_$o.log"
  done
fi
if [[ $what == wstests || $what == pf ]]; then
  # the Gluon forward's GPU tests (own block; both forward forms, with and without PF), side by side
  pids=()
  for k in "gluon_own" "gluon_fwd_ws and persistent_own" "gluon_fwd_ws and persistent_pf" \
           "gluon_fwd_ws and persistent and not own and not pf" "gluon_fwd_ws and per_tile"; do
    timeout 300 python3 -m pytest -q -x tests/test_gpu.py -k "$k" -p no:cacheprovider > "$OUT/tests_pf_${#pids[@]}.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait $p; done
  for i in 0 1 2 3 4; do echo "tests $i: $(tail -1 "$OUT/tests_pf_$i.log")"; grep -m3 -E "^(FAILED|ERROR)|Error" "$OUT/tests_pf_$i.log"; done
fi
if [[ $what == pf ]]; then
  # A/B of the prefetching consumers (PERFLOG 42, GLUON_WS_PF)
  for o in 0 1; do
    MOBA_GLUON_WS_PF=$o timeout 120 python3 benchmarks/bench_kernels.py --cases fwd8k,fwd32k,fb32k --dense cudnn \
      --graph --profile --json "$OUT/pf_$o.json" > "$OUT/pf_$o.log" 2>&1
    MOBA_GLUON_WS_PF=$o timeout 90 python3 benchmarks/bench_kernels.py --cases fwd1m --dense '' --profile \
      --json "$OUT/pf1m_$o.json" > "$OUT/pf1m_$o.log" 2>&1
    echo "pf=$o"; grep -hE "^\| f|own_fwd|sparse_fwd_ws|GPU kernels" "$OUT/pf_$o.log" "$OUT/pf1m_$o.log"
  done
fi
if [[ $what == ab ]]; then
  # A/B of moba/ops/gluon_fwd_ws.py against ./old_ws.py (an untracked copy of the version to compare with), same
  # machine: fwd8k/fwd32k/fb32k (graphs too) and fwd1m kernel times
  cp moba/ops/gluon_fwd_ws.py /tmp/new_ws.py
  for v in old new; do
    if [[ $v == old ]]; then cp old_ws.py moba/ops/gluon_fwd_ws.py; else cp /tmp/new_ws.py moba/ops/gluon_fwd_ws.py; fi
    timeout 120 python3 benchmarks/bench_kernels.py --cases fwd8k,fwd32k,fb32k --dense cudnn --graph --profile \
      --json "$OUT/ab_$v.json" > "$OUT/ab_$v.log" 2>&1
    timeout 90 python3 benchmarks/bench_kernels.py --cases fwd1m --dense '' --profile --json "$OUT/ab1m_$v.json" \
      > "$OUT/ab1m_$v.log" 2>&1
    echo "$v"; grep -hE "^\| f|own_fwd|sparse_fwd_ws|GPU kernels" "$OUT/ab_$v.log" "$OUT/ab1m_$v.log"
  done
  cp /tmp/new_ws.py moba/ops/gluon_fwd_ws.py
fi
if [[ $what == tune ]]; then
  timeout 300 python3 benchmarks/tune.py --json "$OUT/tune.json" > "$OUT/tune.log" 2>&1; cat "$OUT/tune.log"
fi
if [[ $what == kernels || $what == all ]]; then
  timeout 280 python3 benchmarks/bench_kernels.py --cases fwd8k,fb32k,fwd1m --profile --json "$OUT/kernels.json" \
    > "$OUT/kernels.log" 2>&1
  grep -E "^\||host|^ +[0-9.]+ ms" "$OUT/kernels.log"; tail -2 "$OUT/kernels.log"
fi
done
