#!/usr/bin/env bash
# The experiments of experiments/README.md as device calls of under 10 minutes each (one GPU).
# Usage on the GPU machine:  bash experiments/gpu_runs.sh A|B|C    (results tarred to $OUT/<stage>.tgz)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT" runs
D="--corpus stdlib+site --max-corpus-mb 150 --data-dir runs/data"
tr() { name=$1; shift; python3 experiments/train.py $D --out runs/$name "$@" > runs/$name.log 2>&1; tail -2 runs/$name.log; }
case ${1:-A} in
A)  # 1. loss parity at 8K (block 512, topk 3)
    tr s8k_full --preset s8k --attn full --max-minutes 3
    tr s8k_moba --preset s8k --attn moba --max-minutes 3 ;;
B)  # 2. position-wise loss at 32K: full, MoBA, MoBA + last 2 full
    E="--preset s32k --steps 1800 --eval-every 300 --eval-batches 16 --max-minutes 3.8"
    tr s32k_full $E --attn full
    tr s32k_moba $E --attn moba
    tr s32k_moba_last2 $E --attn moba --full-last 2 ;;
C)  # 3. block granularity at 75% sparsity, 32K: topk/blocks 2/8, 4/16, 8/32, 16/64
    for bt in 4096:2 2048:4 1024:8 512:16; do
      tr g32k_${bt%:*}_${bt#*:} --preset s32k --attn moba --block-size ${bt%:*} --topk ${bt#*:} --steps 1200 \
        --eval-every 300 --eval-batches 16 --max-minutes 1.9
    done ;;
D)  # 5. retrieval at 16K, fine-tuned from one full-attention 8K model with full, MoBA and hybrid attention
    tr s8k_full --preset s8k --attn full --max-minutes 3
    R="--preset s8k $D --seq-len 16384 --batch 2 --steps 800 --lr 1e-3 --eval-batches 16 --init runs/s8k_full/ckpt.pt"
    for v in "full:--attn full" "moba:--attn moba" "hybrid:--attn moba --full-last 2"; do
      python3 experiments/retrieval.py $R ${v#*:} --out runs/ret_${v%%:*} > runs/ret_${v%%:*}.log 2>&1
    done
    grep -h "accuracy by depth" runs/ret_*.log ;;
E)  # 4. MoBA for 90% of the steps, then full attention (8K)
    tr s8k_moba_then_full --preset s8k --attn moba --moba-until 0.9 --max-minutes 2.5 ;;
F|F1|F2)  # 1 again with seeds 1 and 2 (F1, F2: one seed per call): the spread of identical runs is the
    # yardstick for the 1% target
    seeds="1 2"; [[ $1 == F1 ]] && seeds=1; [[ $1 == F2 ]] && seeds=2
    for sd in $seeds; do
      tr s8k_full_seed$sd --preset s8k --attn full --seed $sd --max-minutes 2.4
      tr s8k_moba_seed$sd --preset s8k --attn moba --seed $sd --max-minutes 2.4
    done ;;
G)  # 5 again, synthetic: one-token keys in random-token filler, answers' loss only, from scratch at 16K
    R="--preset s8k $D --seq-len 16384 --batch 2 --steps 1500 --pairs 64 --queries 32 --key-len 1 \
       --background random --lm-weight 0 --eval-batches 16 --max-minutes 2.1"
    for v in "full:--attn full" "moba:--attn moba" "hybrid:--attn moba --full-last 2"; do
      timeout 200 python3 experiments/retrieval.py $R ${v#*:} --out runs/syn_${v%%:*} > runs/syn_${v%%:*}.log 2>&1
    done
    grep -h "accuracy by depth" runs/syn_*.log ;;
H)  # 5 again: G with keys and values from 32 ids each (--kv-vocab 32), the variant a CPU trial learned
    R="--preset s8k $D --seq-len 16384 --batch 2 --steps 1500 --pairs 16 --queries 16 --key-len 1 \
       --background random --lm-weight 0 --kv-vocab 32 --eval-batches 16 --max-minutes 2.1"
    for v in "full:--attn full" "moba:--attn moba" "hybrid:--attn moba --full-last 2"; do
      timeout 200 python3 experiments/retrieval.py $R ${v#*:} --out runs/kv_${v%%:*} > runs/kv_${v%%:*}.log 2>&1
    done
    grep -h "accuracy by depth" runs/kv_*.log ;;
I)  # 5 as a curriculum: H's task at 2K with full attention, then fine-tuned at 16K with full, MoBA, hybrid
    C="--preset s8k $D --pairs 16 --queries 16 --key-len 1 --background random --lm-weight 0 --kv-vocab 32 \
       --eval-batches 16"
    timeout 280 python3 experiments/retrieval.py $C --seq-len 2048 --batch 16 --steps 4000 --max-minutes 2.5 \
      --attn full --out runs/cur_2k > runs/cur_2k.log 2>&1
    grep -h "accuracy by depth" runs/cur_2k.log
    for v in "full:--attn full" "moba:--attn moba" "hybrid:--attn moba --full-last 2"; do
      timeout 120 python3 experiments/retrieval.py $C --seq-len 16384 --batch 2 --steps 1500 --max-minutes 1.3 \
        --init runs/cur_2k/ckpt.pt ${v#*:} --out runs/cur_${v%%:*} > runs/cur_${v%%:*}.log 2>&1
    done
    grep -h "accuracy by depth" runs/cur_*.log ;;
J)  # 5 as a curriculum on a small model (dim 256, 4 layers) that learns the plain induction format (<k> a c)
    # first at 256 tokens (batch 64), then 2K, then fine-tuned at 16K with full, MoBA (512/3) and hybrid
    C="--pairs 16 --queries 16 --key-len 1 --background random --lm-weight 0 --kv-vocab 32 --no-v-mark \
       --eval-batches 16 --block-size 512 --topk 3"
    timeout 155 python3 experiments/retrieval.py $C --pairs 8 --queries 8 --seq-len 256 --batch 64 --steps 6000 \
      --lr 3e-3 --max-minutes 2.0 --attn full --out runs/j256 > runs/j256.log 2>&1
    timeout 100 python3 experiments/retrieval.py $C --seq-len 2048 --batch 16 --steps 2000 --lr 1e-3 --max-minutes 1.2 \
      --attn full --init runs/j256/ckpt.pt --out runs/j2k > runs/j2k.log 2>&1
    for v in "full:--attn full" "moba:--attn moba" "hybrid:--attn moba --full-last 1"; do
      timeout 90 python3 experiments/retrieval.py $C --seq-len 16384 --batch 4 --steps 1000 --lr 1e-3 \
        --max-minutes 1.0 --init runs/j2k/ckpt.pt ${v#*:} --out runs/j16k_${v%%:*} > runs/j16k_${v%%:*}.log 2>&1
    done
    for f in runs/j*.log; do echo "$f: $(grep -h 'step ' $f | tail -1)"; grep -h "accuracy by depth" $f; done ;;
K)  # J with more steps per stage (make_batch vectorised): 256 tokens 3 min, 2K 1.5 min, 16K 0.9 min each
    C="--pairs 16 --queries 16 --key-len 1 --background random --lm-weight 0 --kv-vocab 32 --no-v-mark \
       --eval-batches 16 --block-size 512 --topk 3"
    timeout 200 python3 experiments/retrieval.py $C --pairs 8 --queries 8 --seq-len 256 --batch 64 --steps 12000 \
      --lr 3e-3 --max-minutes 3.0 --attn full --out runs/k256 > runs/k256.log 2>&1
    timeout 110 python3 experiments/retrieval.py $C --seq-len 2048 --batch 16 --steps 3000 --lr 1e-3 --max-minutes 1.5 \
      --attn full --init runs/k256/ckpt.pt --out runs/k2k > runs/k2k.log 2>&1
    for v in "full:--attn full" "moba:--attn moba" "hybrid:--attn moba --full-last 1"; do
      timeout 75 python3 experiments/retrieval.py $C --seq-len 16384 --batch 4 --steps 1200 --lr 1e-3 \
        --max-minutes 0.9 --init runs/k2k/ckpt.pt ${v#*:} --out runs/k16k_${v%%:*} > runs/k16k_${v%%:*}.log 2>&1
    done
    for f in runs/k*.log; do echo "$f: $(grep -h 'step ' $f | tail -1)"; grep -h "accuracy by depth" $f; done ;;
L)  # K's curriculum, then MoBA alone fine-tuned at 16K for 4 minutes (K gave it 0.9 minutes)
    C="--pairs 16 --queries 16 --key-len 1 --background random --lm-weight 0 --kv-vocab 32 --no-v-mark \
       --eval-batches 16 --block-size 512 --topk 3"
    timeout 170 python3 experiments/retrieval.py $C --pairs 8 --queries 8 --seq-len 256 --batch 64 --steps 12000 \
      --lr 3e-3 --max-minutes 2.5 --attn full --out runs/l256 > runs/l256.log 2>&1
    timeout 100 python3 experiments/retrieval.py $C --seq-len 2048 --batch 16 --steps 3000 --lr 1e-3 --max-minutes 1.3 \
      --attn full --init runs/l256/ckpt.pt --out runs/l2k > runs/l2k.log 2>&1
    timeout 280 python3 experiments/retrieval.py $C --seq-len 16384 --batch 4 --steps 5000 --lr 1e-3 \
      --max-minutes 4.0 --init runs/l2k/ckpt.pt --attn moba --out runs/l16k_moba > runs/l16k_moba.log 2>&1
    for f in runs/l*.log; do echo "$f: $(grep -h 'step ' $f | tail -1)"; grep -h "accuracy by depth" $f; done ;;
M)  # L with finer blocks at the same sparsity: MoBA 128/12 (12 of 128 blocks) instead of 512/3 at 16K
    C="--pairs 16 --queries 16 --key-len 1 --background random --lm-weight 0 --kv-vocab 32 --no-v-mark \
       --eval-batches 16"
    timeout 170 python3 experiments/retrieval.py $C --pairs 8 --queries 8 --seq-len 256 --batch 64 --steps 12000 \
      --lr 3e-3 --max-minutes 2.5 --attn full --out runs/m256 > runs/m256.log 2>&1
    timeout 100 python3 experiments/retrieval.py $C --seq-len 2048 --batch 16 --steps 3000 --lr 1e-3 --max-minutes 1.3 \
      --attn full --init runs/m256/ckpt.pt --out runs/m2k > runs/m2k.log 2>&1
    timeout 260 python3 experiments/retrieval.py $C --seq-len 16384 --batch 4 --steps 5000 --lr 1e-3 \
      --max-minutes 3.6 --init runs/m2k/ckpt.pt --attn moba --block-size 128 --topk 12 --out runs/m16k_moba128 \
      > runs/m16k_moba128.log 2>&1
    for f in runs/m*.log; do echo "$f: $(grep -h 'step ' $f | tail -1)"; grep -h "accuracy by depth" $f; done ;;
esac
tar czf "$OUT/${1:-A}.tgz" runs/*.log runs/*/history.json runs/*/retrieval.json runs/*/*.png runs/data/*/meta.json \
  2>/dev/null; ls -la "$OUT"
