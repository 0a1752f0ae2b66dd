"""Try tile configs per kernel kind on the GPU; print the time of the case each kind matters for.

    python benchmarks/tune.py [--kinds own,fwd,gate,dkdv,dq,own_dq] [--json out.json]

Every kind (see ``parallel.KINDS``) has its own (BM rows, BN keys, num_warps, num_stages). One kind is
varied at a time, the others at ``parallel.GPU_DEFAULT``; the best of each is then applied together and
the cases are timed once more. Used to pick ``parallel.GPU_DEFAULT`` (PERFLOG.md records the choices).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import triton.testing

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
import moba  # noqa: E402
from moba.ops import parallel  # noqa: E402

K = 1024
CANDIDATES = {
    "gate": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 2), (64, 64, 4, 2)],
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 2)],
    "own": [(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2), (64, 128, 4, 2), (128, 32, 4, 3)],
    "dkdv": [(64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 8, 3), (16, 128, 8, 3)],
    "dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (64, 128, 4, 2)],
    "own_dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (64, 128, 4, 2)],
}
# the cases a kind is judged by: (T, block, topk, fwd_bwd)
JUDGE = {"gate": [(32 * K, 512, 3, False)], "fwd": [(8 * K, 512, 3, False), (128 * K, 4096, 12, False)],
         "own": [(8 * K, 512, 3, False), (32 * K, 512, 3, False)], "dkdv": [(32 * K, 512, 3, True)],
         "dq": [(32 * K, 512, 3, True)], "own_dq": [(32 * K, 512, 3, True)]}


def inputs(T, grad=False):
    torch.manual_seed(0)
    xs = [torch.randn(1, T, h, 128, device="cuda", dtype=torch.bfloat16) for h in (32, 8, 8)]
    return [x.requires_grad_(grad) for x in xs]


def case_ms(T, bs, topk, fb):
    q, k, v = inputs(T, fb)
    if not fb:
        def run():
            with torch.no_grad():
                moba.moba_attention(q, k, v, bs, topk)
    else:
        do = torch.randn_like(q)

        def run():
            for x in (q, k, v):
                x.grad = None
            torch.autograd.backward(moba.moba_attention(q, k, v, bs, topk), do)
    return triton.testing.do_bench(run, warmup=10, rep=100, return_mode="median")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kinds", default=",".join(CANDIDATES))
    p.add_argument("--json", default=None)
    a = p.parse_args()
    best, log = {}, []
    for kind in a.kinds.split(","):
        res = []
        for c in CANDIDATES[kind]:
            parallel.CONFIG[kind] = c
            try:
                ms = [case_ms(*case) for case in JUDGE[kind]]
            except Exception as e:   # noqa: BLE001 -- a config that does not compile (shared memory) is skipped
                print(f"{kind} {c}: failed: {str(e).splitlines()[0][:100]}", flush=True)
                continue
            res.append((sum(ms), c))
            log.append(dict(kind=kind, config=c, ms=ms))
            print(f"{kind} {c}: " + " / ".join(f"{m:.3f}" for m in ms) + " ms", flush=True)
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
