"""Where the host's time goes in one MoBA forward on a GPU: wall time per call (issue only, and with the GPU), the
Python functions that take it (cProfile), and the same call captured in a CUDA graph (replay time, and whether the
replay equals an eager call). For a forward that the host, not the GPU, bounds (short sequences); ``run.py
--profile`` gives the host/GPU split of any case, this says which Python lines the host time is spent in.

    python benchmarks/tools/host_profile.py [--case fwd8k] [--backend auto] [--calls 100]
"""
import argparse
import cProfile
import io
import pathlib
import pstats
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))     # benchmarks/: the case registry
import run  # noqa: E402

import moba  # noqa: E402
from moba.bench import cuda_graph  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="fwd8k", help="an attention case of benchmarks/run.py (its forward is timed)")
    ap.add_argument("--T", type=int, default=None, help="override the case's length")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--topk", type=int, default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--fwd-bwd", action="store_true", help="time forward and backward (torch.autograd.grad)")
    a = ap.parse_args()
    c = run.case(a.case, T=a.T, block_size=a.block_size, topk=a.topk, fwd_bwd=a.fwd_bwd)
    q, k, v, do = run.inputs(c, "cuda", torch.bfloat16)
    if a.fwd_bwd:
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        do = torch.randn_like(q) if do is None else do

    def f():
        if not a.fwd_bwd:
            return moba.moba_attention(q, k, v, c.block_size, c.topk, backend=a.backend)
        return torch.autograd.grad(moba.moba_attention(q, k, v, c.block_size, c.topk, backend=a.backend), (q, k, v),
                                   do)[0]

    print(f"{torch.cuda.get_device_name()}: {c.name} {'fwd+bwd' if a.fwd_bwd else 'forward'}, B={c.batch} T={c.T} "
          f"H={c.heads}/{c.kv_heads} "
          f"D={c.head_dim}, block {c.block_size}, topk {c.topk}, backend {a.backend}")
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
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(30)
    print(s.getvalue())
    # the dispatcher's view (cProfile's attribution is unreliable across C++ dispatch): self CPU time per op
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            f()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    try:
        replay, out = cuda_graph(f)
    except Exception as e:            # noqa: BLE001 — report, do not hide
        print("graph capture failed:", type(e).__name__, str(e)[:500])
        return
    replay()
    torch.cuda.synchronize()
    want = f()
    print("graph replay equals eager:", torch.equal(out, want), float((out.float() - want.float()).abs().max()))
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.calls):
        replay()
    torch.cuda.synchronize()
    print(f"graph: {(time.perf_counter() - t) / a.calls * 1e3:.3f} ms/replay")


if __name__ == "__main__":
    main()
