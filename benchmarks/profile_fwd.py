"""A few MoBA forward calls at one shape, for a profiler to attach to (Nsight Compute on the GPU machine):

    ncu --clock-control none -k regex:"sparse_fwd_ws_persistent|own_fwd_ws" --launch-skip 6 --launch-count 3 \
        --set full -o fwd8k python3 benchmarks/profile_fwd.py --T 8192 --block 512 --topk 3
"""
import argparse

import torch

import moba
from bench_kernels import make   # the benchmarks' inputs (seed 0), this directory being on the path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--calls", type=int, default=4)
    a = ap.parse_args()
    q, k, v = make(a.T, 32, 8, 128, torch.bfloat16, False)
    for _ in range(a.calls):
        moba.moba_attention(q, k, v, a.block, a.topk)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
