#!/usr/bin/env bash
# Queues of runs that outlast one device call, one queue per GPU, on a machine of several GPUs. Each queue is a bash
# command line (for example "SEED=2 bash experiments/gpu_runs.sh R") run detached (setsid) with CUDA_VISIBLE_DEVICES
# set to its index; the machine keeps it running between calls for as long as it stays warm (call `wait` again at
# once: the machine goes back after its idle release). Queue 0 starts first; the others start once it has built the
# corpus (runs/data/*/meta.json), so that no two runs build it at once. Usage on the GPU machine:
#   bash experiments/gpu_detached.sh start "<queue 0>" "<queue 1>" ...
#   bash experiments/gpu_detached.sh wait <seconds>   # until every queue is done or <seconds> pass: each queue's
#                                                     # log tail, every run's last evaluation; runs/ tarred to $OUT
set -u; shopt -s nullglob
export PYTHONPATH=. PYTHONUNBUFFERED=1 SECONDS_LEFT=${SECONDS_LEFT:-3000}
OUT=${OUT:-out}; Q=runs/queues; mkdir -p "$OUT" $Q
case ${1:-} in
start)
  shift; i=0
  for cmd in "$@"; do
    CUDA_VISIBLE_DEVICES=$i OUT=runs/q$i setsid bash -c "mkdir -p runs/q$i; ( $cmd ); echo \$? > $Q/$i.done" \
      > $Q/$i.log 2>&1 < /dev/null &
    echo "queue $i (GPU $i): $cmd"
    if (( i == 0 && $# > 1 )); then
      bash experiments/wait_corpus.sh
    fi
    i=$((i + 1))
  done
  echo $i > $Q/count ;;
wait)
  n=$(cat $Q/count); end=$((SECONDS + ${2:-540}))
  while (( SECONDS < end )); do
    d=0; for ((i = 0; i < n; i++)); do [[ -f $Q/$i.done ]] && d=$((d + 1)); done
    (( d == n )) && break
    sleep 10
  done
  for ((i = 0; i < n; i++)); do
    echo "== queue $i: $( [[ -f $Q/$i.done ]] && echo "done, exit $(cat $Q/$i.done)" || echo running)"
    tail -4 $Q/$i.log
  done
  for f in runs/*.log; do echo "$f: $(grep -h '^eval' "$f" | tail -1)"; done
  tar czf "$OUT/state.tgz" runs/*.log runs/*/history.json runs/*/*.json runs/queues runs/q[0-9]*/ \
    --exclude='*.pt' --exclude='*.tgz' --exclude='runs/data' 2>/dev/null; ls -la "$OUT" ;;
*) echo "usage: $0 start <queue>... | wait <seconds>"; exit 2 ;;
esac
