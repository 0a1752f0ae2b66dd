"""The forward's own host work without a GPU: `custom._forward` at an fwd8k-like shape on CPU tensors, the Gluon path
forced and every Triton/Gluon kernel launch replaced by a no-op, so that what is timed is the Python and torch work
around the launches (PERFLOG 51). The launches themselves and CUDA allocations cost more on a GPU host:
`host_profile.py` measures the real call there.

    python benchmarks/host_stub_profile.py [--T 8192] [--calls 200] [--profile]
"""
import argparse
import cProfile
import pstats
import time

import torch
import triton

from moba.ops import custom, gluon_fwd_ws, parallel


class _NoLaunch:
    """Stands for a kernel: ``kernel[grid](...)`` counts the launch and does nothing."""

    def __init__(self, name):
        self.name, self.launches = name, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
        return launch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--profile", action="store_true", help="also print cProfile's top entries")
    a = ap.parse_args()
    stubs = []
    for mod in (parallel, gluon_fwd_ws):
        for name in dir(mod):
            if isinstance(getattr(mod, name), triton.runtime.jit.JITFunction) or \
                    type(getattr(mod, name)).__name__ == "GluonJITFunction":
                stubs.append(_NoLaunch(name))
                setattr(mod, name, stubs[-1])
    parallel._gluon_usable = lambda *args: True
    gluon_fwd_ws.usable = lambda k, v: True
    parallel.sm_count = lambda device: 132
    q = torch.randn(1, a.T, 32, 128, dtype=torch.bfloat16)
    k, v = (torch.randn(1, a.T, 8, 128, dtype=torch.bfloat16) for _ in range(2))

    def call():
        return custom._forward(q, k, v, None, None, 512, 3, 128 ** -0.5, "triton", False, None)

    for _ in range(3):
        call()
    t = time.perf_counter()
    for _ in range(a.calls):
        call()
    print(f"{(time.perf_counter() - t) / a.calls * 1e6:.1f} us per call (CPU tensors, launches stubbed); launches "
          f"per call: {({s.name: s.launches // (a.calls + 3) for s in stubs if s.launches})}")
    if a.profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(a.calls):
            call()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
