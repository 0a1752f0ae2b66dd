"""Host cost of one MoBA forward call on a GPU: wall time per call, where the host's time goes (cProfile), and
the same call captured in a CUDA graph (replay time, and whether the replay matches an eager call).

    python benchmarks/host_profile.py [--T 8192] [--block 512] [--topk 3]
"""
import argparse
import cProfile
import io
import pstats
import time

import torch

import moba
from bench_kernels import make   # the benchmarks' inputs (seed 0), this directory being on the path
from moba.bench import cuda_graph


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--calls", type=int, default=100)
    a = ap.parse_args()
    q, k, v = make(a.T, 32, 8, 128, torch.bfloat16, False)

    def f():
        return moba.moba_attention(q, k, v, a.block, a.topk)

    for _ in range(5):
        f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.calls):
        f()
    host = (time.perf_counter() - t) / a.calls * 1e3
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / a.calls * 1e3
    print(f"eager: {host:.3f} ms/call to issue, {wall:.3f} ms/call with the GPU")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(50):
        f()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue())
    # the same call in a CUDA graph
    try:
        replay, out = cuda_graph(f)
    except Exception as e:            # noqa: BLE001 — report, do not hide
        print("graph capture failed:", type(e).__name__, str(e)[:500])
        return
    replay()
    torch.cuda.synchronize()
    want = f()
    print("graph replay matches eager:", torch.equal(out, want), float((out.float() - want.float()).abs().max()))
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.calls):
        replay()
    torch.cuda.synchronize()
    print(f"graph: {(time.perf_counter() - t) / a.calls * 1e3:.3f} ms/replay")


if __name__ == "__main__":
    main()
