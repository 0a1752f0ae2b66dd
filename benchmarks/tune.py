"""Try kernel tile configs on the GPU and print where the time goes (torch profiler, per kernel).

    python benchmarks/tune.py            # prints a table per pass; used to pick parallel.GPU_DEFAULT
"""
from __future__ import annotations

import sys

import torch
import triton.testing

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
import moba  # noqa: E402
from moba.ops import parallel  # noqa: E402

FWD = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2)]
BWD = [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (128, 64, 8, 2), (32, 128, 4, 3), (64, 32, 4, 3)]
K = 1024


def inputs(T, grad=False):
    torch.manual_seed(0)
    xs = [torch.randn(1, T, h, 128, device="cuda", dtype=torch.bfloat16) for h in (32, 8, 8)]
    return [x.requires_grad_(grad) for x in xs]


def fwd_time(T, bs, topk):
    q, k, v = inputs(T)
    with torch.no_grad():
        return triton.testing.do_bench(lambda: moba.moba_attention(q, k, v, bs, topk), warmup=25, rep=150,
                                       return_mode="median")


def fb_time(T, bs, topk):
    q, k, v = inputs(T, True)
    do = torch.randn_like(q)

    def run():
        for x in (q, k, v):
            x.grad = None
        torch.autograd.backward(moba.moba_attention(q, k, v, bs, topk), do)
    return triton.testing.do_bench(run, warmup=25, rep=150, return_mode="median")


def profile(fn, title):
    from torch.profiler import ProfilerActivity, profile as prof
    fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
        fn()
        torch.cuda.synchronize()
    print(f"\n### {title}")
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40))


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "fwd,bwd,prof"
    if "fwd" in which:
        print("fwd config (BM, BN, warps, stages) | 32K 512/3 ms | 128K 4096/12 ms", flush=True)
        for c in FWD:
            parallel.CONFIG["fwd"] = c
            print(c, f"{fwd_time(32 * K, 512, 3):.2f}", f"{fwd_time(128 * K, 4096, 12):.2f}", flush=True)
        parallel.CONFIG["fwd"] = None
    if "bwd" in which:
        print("bwd config | fwd+bwd 32K 512/3 ms", flush=True)
        for c in BWD:
            parallel.CONFIG["bwd"] = c
            print(c, f"{fb_time(32 * K, 512, 3):.2f}", flush=True)
        parallel.CONFIG["bwd"] = None
    if "prof" in which:
        q, k, v = inputs(128 * K)
        with torch.no_grad():
            profile(lambda: moba.moba_attention(q, k, v, 4096, 12), "fwd 128K block 4096 topk 12")
        q, k, v = inputs(32 * K, True)
        do = torch.randn_like(q)
        profile(lambda: torch.autograd.backward(moba.moba_attention(q, k, v, 512, 3), do),
                "fwd+bwd 32K block 512 topk 3")


if __name__ == "__main__":
    main()
