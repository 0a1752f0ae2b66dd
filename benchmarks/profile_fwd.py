"""A few MoBA forward calls at one shape, for a profiler to attach to (Nsight Compute on the GPU machine):

    ncu --clock-control none -k regex:"sparse_fwd_ws_persistent|own_fwd_ws" --launch-skip 6 --launch-count 3 \
        --set full -o fwd8k python3 benchmarks/profile_fwd.py --T 8192 --block 512 --topk 3
"""
import argparse

import torch

import moba


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--calls", type=int, default=4)
    a = ap.parse_args()
    torch.manual_seed(0)
    q = torch.randn(1, a.T, 32, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, a.T, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(a.calls):
        moba.moba_attention(q, k, v, a.block, a.topk)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
