"""The library's own Python per call, with every kernel launch stubbed out: what is left of a call's host time
once the launches cost nothing. Runs on the CPU (no GPU needed; the Triton path's host code runs on CPU tensors, its
launches replaced by a counter). The torch ops between launches run for real there: fills of large buffers (the
backward's fp32 dQ sum at 8K is 128 MiB of zeros) make fb8k's figure mostly memory time, not Python.

    python benchmarks/tools/host_stub.py [--case decode128k|fwd8k|fb8k] [--calls 500]
"""
import argparse
import cProfile
import os
import pathlib
import pstats
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")       # the kernels are never run; this only lets them be defined

import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))     # benchmarks/: the case registry
import run  # noqa: E402

import moba  # noqa: E402
import moba.triton.bwd  # noqa: E402,F401
import moba.triton.decode  # noqa: E402,F401
import moba.triton.fwd  # noqa: E402,F401


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="decode128k", choices=("decode128k", "fwd8k", "fb8k"))
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--profile", action="store_true", help="also cProfile's top functions by own time")
    a = ap.parse_args()
    launches = [0]

    def stub(fn, grid, *args, **kw):
        launches[0] += 1
    for m in list(sys.modules.values()):
        if getattr(m, "__name__", "").startswith("moba.triton") and hasattr(m, "launch_kernel"):
            m.launch_kernel = stub
    torch.manual_seed(0)
    Hq, Hkv, D = 32, 8, 128
    if a.case == "decode128k":      # B=1, contiguous cache, block 4096, topk 12, the new key appended
        T = 128 * 1024
        kc = torch.randn(1, T, Hkv, D)
        vc = torch.randn_like(kc)
        lens = torch.full((1,), T - 1, dtype=torch.int32)
        sums = torch.zeros(1, T // 4096, Hkv, D)
        q, kn, vn = torch.randn(1, 1, Hq, D), torch.randn(1, 1, Hkv, D), torch.randn(1, 1, Hkv, D)

        def f():
            moba.moba_attention_with_kvcache(q, kc, vc, 4096, 12, cache_seqlens=lens, k_new=kn, v_new=vn,
                                             key_sums=sums, backend="triton")
    else:                           # the attention cases of benchmarks/run.py, bf16
        c = run.case(a.case)
        q, k, v, do = run.inputs(c, "cpu", torch.bfloat16)

        def f():
            out = moba.moba_attention(q, k, v, c.block_size, c.topk, backend="triton")
            if c.fwd_bwd:
                torch.autograd.grad(out, (q, k, v), do)
    for _ in range(20):
        f()
    launches[0] = 0
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(a.calls):
            f()
        ts.append((time.perf_counter() - t) / a.calls * 1e6)
    print(f"{a.case}: {sorted(ts)[2]:.1f} us of Python per call (median of 5 x {a.calls}), "
          f"{launches[0] / (5 * a.calls):.0f} launches stubbed per call")
    if a.profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(a.calls):
            f()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
