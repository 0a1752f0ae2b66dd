#!/usr/bin/env bash
# One device call's worth of GPU work, in priority order, each step time-limited; logs under $OUT (or ./out).
# Usage on the lent GPU machine:  bash benchmarks/gpu_checks.sh [tests|decode|tune|kernels|gluon|persist|own|wstests|pf|qe|og|gh|oggh|ab|all]...
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
# the two gates' GPU tests (PERFLOG 47-48), logs in /tmp: the gate inside the own-block kernel; and with the gate by
# kv head on, the forward against the reference and the gate's own tests, side by side
og_tests() {
  timeout 300 python3 -m pytest -q -x tests/test_gpu.py -k "persistent_own_gate" -p no:cacheprovider > /tmp/og.log 2>&1
}
gh_tests() {
  MOBA_GATE_HEADS=1 timeout 300 python3 -m pytest -q -x tests/test_gpu.py -k "against_reference or captures" \
    -p no:cacheprovider > /tmp/gh.log 2>&1 &
  local p=$!
  MOBA_GATE_HEADS=1 timeout 300 python3 -m pytest -q -x tests/test_triton.py -k "gate" -p no:cacheprovider \
    > /tmp/gh2.log 2>&1
  wait $p
}
# each log's last line and its first failures
tail_logs() { for f in "$@"; do echo "$f: $(tail -1 "$f")"; grep -m3 -E "^(FAILED|ERROR)|Error" "$f"; done; }
for what in "${@:-all}"; do
if [[ $what == tests || $what == all ]]; then
  # the compiled kernels against the fp64 reference: the whole GPU suite, test_gpu in groups, all side by side
  # (Triton compilation is most of the time and uses one CPU core per process; ~5 minutes on a fresh machine)
  bash benchmarks/gpu_suite.sh
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
if [[ $what == wstests || $what == own || $what == pf || $what == qe ]]; then
  # the Gluon forward's GPU tests (own block; both forward forms, with and without PF and SST), side by side
  # (compiling is most of it, one core each)
  pids=()
  for k in "gluon_own" "gluon_fwd_ws and persistent_own" "gluon_fwd_ws and persistent_pf" \
           "gluon_fwd_ws and persistent_sst" "gluon_fwd_ws and persistent_qe" \
           "gluon_fwd_ws and persistent and not own and not pf and not sst and not qe" "gluon_fwd_ws and per_tile"; do
    timeout 300 python3 -m pytest -q -x tests/test_gpu.py -k "$k" -p no:cacheprovider > "/tmp/tests_ws_${#pids[@]}.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait $p; done
  tail_logs /tmp/tests_ws_*.log
fi
# fwd8k/fwd32k/fb32k (cuDNN, CUDA graphs) and fwd1m kernel times into $OUT/$1.json and $OUT/${1}_1m.json (the logs
# stay in /tmp: the device returns only ~8 files per call)
bench_pair() {
  timeout 120 python3 benchmarks/bench_kernels.py --cases fwd8k,fwd32k,fb32k --dense cudnn --graph --profile \
    --json "$OUT/$1.json" > "/tmp/$1.log" 2>&1
  timeout 90 python3 benchmarks/bench_kernels.py --cases fwd1m --dense '' --profile --json "$OUT/${1}_1m.json" \
    > "/tmp/${1}_1m.log" 2>&1
  echo "$1"; grep -hE "^\| f|own_fwd|sparse_fwd_ws|_gate_topk|GPU kernels" "/tmp/$1.log" "/tmp/${1}_1m.log"
}
# A/B of one switch: bench_pair with the environment variable $1 set to 0, then 1
ab_switch() { for o in 0 1; do export "$1=$o"; bench_pair "${2}_$o"; done; unset "$1"; }
if [[ $what == own ]]; then ab_switch MOBA_GLUON_OWN_SST own_sst; fi   # the own block's staged stores (PERFLOG 44)
if [[ $what == pf ]]; then ab_switch MOBA_GLUON_WS_PF pf; fi           # the prefetching consumers (PERFLOG 42)
if [[ $what == og ]]; then     # the gate inside the own-block kernel (PERFLOG 47): its tests, then A/B
  og_tests; tail_logs /tmp/og.log
  ab_switch MOBA_GLUON_OWN_GATE own_gate
fi
if [[ $what == gh ]]; then     # the gate by kv head (PERFLOG 47): its tests with it on, then A/B
  gh_tests; tail_logs /tmp/gh.log /tmp/gh2.log
  ab_switch MOBA_GATE_HEADS gate_heads
fi
if [[ $what == oggh ]]; then   # the two gates of PERFLOG 47-48 (on since entry 49): their tests side by side, then base, og, gh, both
  og_tests & p1=$!
  gh_tests; wait $p1
  tail_logs /tmp/og.log /tmp/gh.log /tmp/gh2.log
  for g in "0 0" "1 0" "0 1" "1 1"; do set -- $g
    MOBA_GLUON_OWN_GATE=$1 MOBA_GATE_HEADS=$2 bench_pair "oggh_$1$2"
  done
fi
if [[ $what == qe ]]; then                                               # the early Q copies (PERFLOG 45)
  ab_switch MOBA_GLUON_WS_QE qe
  export MOBA_GLUON_WS_QE=1; ab_switch MOBA_GLUON_OWN_QE own_qe; unset MOBA_GLUON_WS_QE
  for o in 0 1; do
    MOBA_GLUON_WS_QE=$o timeout 90 python3 benchmarks/ws_phases.py --json "$OUT/phases_qe_$o.json" | grep -v "slot 1"
  done
fi
if [[ $what == ab ]]; then
  # A/B of moba/ops/gluon_fwd_ws.py against ./old_ws.py (an untracked copy of the version to compare with), same
  # machine
  cp moba/ops/gluon_fwd_ws.py /tmp/new_ws.py
  cp old_ws.py moba/ops/gluon_fwd_ws.py; bench_pair ab_old
  cp /tmp/new_ws.py moba/ops/gluon_fwd_ws.py; bench_pair ab_new
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
