#!/usr/bin/env bash
# The whole GPU suite in one device call (a 16-core GPU machine, about 7 minutes on an H100): every test file with
# CUDA cases, the longest split into groups by -k, all side by side with 540 s each (SUITE_TIMEOUT); one summary line per process (and
# its first failures).
# test_random_configs runs its CUDA cases only: the CPU ones run in CI, and beside the rest they outlast the limit.
# Usage: bash benchmarks/gpu_suite.sh
export PYTHONPATH=.
groups=(  # "files|-k expression"
  "test_forward.py|matches_reference" "test_forward.py|cuda_against_reference"
  "test_forward.py|gluon_forward and in_own_kernel" "test_forward.py|gluon_forward and triton_gate"
  "test_forward.py|not matches_reference and not cuda_against_reference and not gluon_forward"
  "test_backward.py|gluon_dkdv" "test_backward.py|not gluon_dkdv" "test_varlen.py" "test_cuda_graphs.py"
  "test_gate.py test_grouping.py" "test_decode.py test_group_gate.py" "test_kvcache.py" "test_compile.py test_validation.py test_bench.py test_launch.py" "test_hf.py"
  "test_random_configs.py|cuda-triton" "test_random_configs.py|cuda-gluon")
pids=()
for i in "${!groups[@]}"; do
  IFS='|' read -r files k <<< "${groups[$i]}"
  timeout ${SUITE_TIMEOUT:-540} python3 -m pytest -q $(printf 'tests/%s ' $files) ${k:+-k "$k"} -p no:cacheprovider > /tmp/s_$i.log 2>&1 &
  pids+=($!)
done
rcs=(); for p in "${pids[@]}"; do wait $p; rcs+=($?); done
for i in "${!pids[@]}"; do
  echo "${groups[$i]}: $(tail -1 /tmp/s_$i.log)$( ((rcs[i] == 124)) && echo "  [cut by the ${SUITE_TIMEOUT:-540} s limit]")"
  grep -m3 -E "^(FAILED|ERROR)" /tmp/s_$i.log
done
