"""Try tile configs per kernel kind on the GPU; print the time of the case each kind matters for.

    python benchmarks/tune.py [--kinds own,fwd,gate,dkdv,dq,own_dq] [--kernel-times] [--json out.json]

Every kind (see ``parallel.KINDS``) has its own (BM rows, BN keys, num_warps, num_stages). One kind is
varied at a time, the others at ``parallel.GPU_DEFAULT``; the best of each is then applied together and
the cases are timed once more. Used to pick ``parallel.GPU_DEFAULT`` (PERFLOG.md records the choices).
With ``--kernel-times`` a config is judged by the GPU time of its own kernel (torch.profiler), not by
the wall time of the whole call, which a slow host can decide at short lengths; configs are ranked by
their mean time relative to the first (current) config over the kind's cases.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import triton.testing

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
sys.path.insert(0, __file__.rsplit("/", 1)[0])
import moba  # noqa: E402
from bench_kernels import make, step  # noqa: E402
from moba.ops import parallel  # noqa: E402

K = 1024
KERNEL = {"gate": "_gate_topk", "fwd": "_sparse_fwd", "own": "_own_fwd", "dkdv": "_dkdv", "dq": "_sparse_dq",
          "own_dq": "_own_dq"}
CANDIDATES = {
    "gate": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 2), (64, 64, 4, 2)],
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 3),
            (64, 64, 4, 2)],
    "own": [(128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 2), (128, 32, 4, 3),
            (64, 32, 4, 3), (32, 64, 4, 3)],
    "dkdv": [(32, 64, 4, 3), (64, 64, 4, 2), (32, 128, 8, 2), (32, 64, 4, 4), (64, 64, 4, 3), (16, 64, 4, 3),
             (32, 32, 4, 3), (64, 32, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (16, 128, 8, 3), (32, 128, 8, 4),
             (32, 128, 4, 2)],
    "dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (64, 128, 4, 2), (64, 32, 4, 3),
           (32, 64, 4, 3)],
    "own_dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (64, 128, 4, 2), (64, 32, 4, 3),
               (32, 64, 4, 3)],
}
# the cases a kind is judged by: (T, block, topk, fwd_bwd)
JUDGE = {"gate": [(32 * K, 512, 3, False)], "fwd": [(8 * K, 512, 3, False), (128 * K, 4096, 12, False)],
         "own": [(8 * K, 512, 3, False), (32 * K, 512, 3, False)], "dkdv": [(32 * K, 512, 3, True)],
         "dq": [(32 * K, 512, 3, True)], "own_dq": [(32 * K, 512, 3, True)]}


def case_fn(T, bs, topk, fb):
    """One MoBA call on the issue's shapes (bf16, 32/8 heads, D 128), as bench_kernels times it."""
    q, k, v = make(T, 32, 8, 128, torch.bfloat16, fb)
    return step(lambda a, b, c: moba.moba_attention(a, b, c, bs, topk), q, k, v, fb)


def case_ms(T, bs, topk, fb):
    return triton.testing.do_bench(case_fn(T, bs, topk, fb), warmup=10, rep=100, return_mode="median")


def kernel_ms(kind, T, bs, topk, fb, n=5):
    """GPU time of the kind's kernel per call (all its launches), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    run = case_fn(T, bs, topk, fb)
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as pr:
        for _ in range(n):
            run()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in pr.key_averages() if e.key == KERNEL[kind]) / n / 1e3


def compiled_regs(kind):
    """Registers and spilled registers of the kind's kernel as last compiled (the config just run)."""
    fn = getattr(parallel, KERNEL[kind])
    kern = [k for cache in fn.device_caches.values() for k in cache[0].values()]
    return (kern[-1].n_regs, kern[-1].n_spills) if kern else (None, None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kinds", default=",".join(CANDIDATES))
    p.add_argument("--json", default=None)
    p.add_argument("--kernel-times", action="store_true", help="judge by the kernel's GPU time (profiler)")
    p.add_argument("--configs", default=None,
                   help="configs to try instead of the built-in list, e.g. '32,128,8,3;32,128,16,3' (one kind)")
    a = p.parse_args()
    if a.configs and a.kinds not in CANDIDATES:
        p.error(f"--configs needs one kind in --kinds (one of {', '.join(CANDIDATES)}), got {a.kinds!r}")
    if a.configs:
        CANDIDATES[a.kinds] = [tuple(int(x) for x in c.split(",")) for c in a.configs.split(";")]
    best, log = {}, []
    for kind in a.kinds.split(","):
        res = []
        for c in CANDIDATES[kind]:
            parallel.CONFIG[kind] = c
            try:
                ms = [kernel_ms(kind, *case) if a.kernel_times else case_ms(*case) for case in JUDGE[kind]]
            except Exception as e:   # noqa: BLE001 -- a config that does not compile (shared memory) is skipped
                print(f"{kind} {c}: failed: {str(e).splitlines()[0][:100]}", flush=True)
                continue
            if not res:
                ref = ms
            res.append((sum(m / r for m, r in zip(ms, ref)) / len(ms) if a.kernel_times else sum(ms), c))
            log.append(dict(kind=kind, config=c, ms=ms))
            regs, spills = compiled_regs(kind)
            log[-1].update(regs=regs, spills=spills)
            print(f"{kind} {c}: " + " / ".join(f"{m:.3f}" for m in ms) + " ms"
                  + (f"  (relative {res[-1][0]:.3f})" if a.kernel_times else "")
                  + f"  regs {regs} spills {spills}", flush=True)
        parallel.CONFIG[kind] = None
        best[kind] = min(res)[1]
        print(f"best {kind}: {best[kind]}", flush=True)
    print("\nbest per kind:", best)
    before = {f"{c}": case_ms(*c) for c in [(8 * K, 512, 3, False), (32 * K, 512, 3, True)]}
    parallel.CONFIG.update(best)
    after = {f"{c}": case_ms(*c) for c in [(8 * K, 512, 3, False), (32 * K, 512, 3, True)]}
    for c in before:
        print(f"{c}: GPU_DEFAULT {before[c]:.3f} ms -> best configs {after[c]:.3f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(best=best, log=log, before=before, after=after, gpu=torch.cuda.get_device_name()), f,
                      indent=1)


if __name__ == "__main__":
    main()
