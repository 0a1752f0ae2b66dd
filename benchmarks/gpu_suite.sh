#!/usr/bin/env bash
# The whole GPU suite in one device call (~5 minutes on a fresh H100 machine, 16 cores): test_gpu in groups and the
# other GPU-capable test files, all side by side; one line per process. Usage: bash benchmarks/gpu_suite.sh
export PYTHONPATH=.
pids=(); names=()
groups=("against_reference or varlen_and_decode" "deterministic or gluon_dkdv" "captures or gluon_own or bench"
        "gluon_fwd_ws and persistent_sst" "gluon_fwd_ws and persistent_pf" "gluon_fwd_ws and persistent_qe"
        "gluon_fwd_ws and persistent_own and not gate" "gluon_fwd_ws and persistent_own_gate"
        "gluon_fwd_ws and persistent and not own and not pf and not sst and not qe" "gluon_fwd_ws and per_tile")
for i in "${!groups[@]}"; do
  timeout 540 python3 -m pytest -q tests/test_gpu.py -k "${groups[$i]}" -p no:cacheprovider > /tmp/s_$i.log 2>&1 &
  pids+=($!); names+=("test_gpu: ${groups[$i]}")
done
# test_random_configs: its CUDA variant only (the CPU ones run in CI, and beside the rest they outlast the limit)
for f in test_triton test_decode test_compile test_hf test_attention "test_random_configs -k cuda"; do
  i=${#pids[@]}
  a=($f)
  timeout 540 python3 -m pytest -q tests/${a[0]}.py "${a[@]:1}" -p no:cacheprovider > /tmp/s_$i.log 2>&1 &
  pids+=($!); names+=("$f")
done
rcs=(); for p in "${pids[@]}"; do wait $p; rcs+=($?); done
for i in "${!pids[@]}"; do
  echo "${names[$i]}: $(tail -1 /tmp/s_$i.log)$( ((rcs[i] == 124)) && echo "  [cut by the 540 s limit]")"
  grep -m3 -E "^(FAILED|ERROR)" /tmp/s_$i.log
done
