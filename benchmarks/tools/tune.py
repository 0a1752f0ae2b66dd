"""Tile configs of the Triton kernels, tried per kernel kind on a GPU: how ``moba.triton.configs.GPU_DEFAULT`` is
chosen and re-checked on a new card or Triton release.

    python benchmarks/tools/tune.py [--kinds gate,fwd,own,dkdv,dq,own_dq] [--kernel-times] [--configs ...]

Every kind (``moba.triton.configs.KINDS``) has its own (BM rows, BN keys, num_warps, num_stages). One kind is
varied at a time through ``moba.triton.configs.CONFIG``, the others at ``GPU_DEFAULT``, each judged on the
``benchmarks/run.py`` cases it matters for (``JUDGE``); the best of each is then applied together and the cases
are timed once more. The calls run the "triton" backend: on sm_90 the "gluon" one replaces the own-block,
chosen-block and dK/dV kernels, so their Triton configs would not be timed. With ``--kernel-times`` a config is
judged by the GPU time of its own kernels (torch.profiler), not by the wall time of the whole call, which the host
can decide at short lengths; configs are then ranked by their mean time relative to the first (current) config.
One JSON line per run is appended to benchmarks/results/tune.jsonl (``--out`` to change, ``--no-record`` for none).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))     # benchmarks/: the case registry
import run  # noqa: E402

import moba  # noqa: E402
from moba.bench import append_jsonl, source_commit, step, time_ms, versions  # noqa: E402
from moba.triton import bwd, configs, fwd, gate  # noqa: E402

# the kernels each kind's config sets: (module, kernel names)
KERNELS = {"gate": (gate, ("_gate_topk", "_gate_topk_g")), "fwd": (fwd, ("_sparse_fwd",)),
           "own": (fwd, ("_own_fwd",)), "dkdv": (bwd, ("_dkdv",)), "dq": (bwd, ("_sparse_dq",)),
           "own_dq": (bwd, ("_own_dq",))}
CANDIDATES = {
    "gate": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 2), (64, 64, 4, 2)],
    "fwd": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 3),
            (64, 64, 4, 2)],
    "own": [(64, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 128, 4, 2), (128, 32, 4, 3),
            (64, 32, 4, 3), (32, 64, 4, 3)],
    "dkdv": [(32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2), (32, 128, 8, 2), (32, 64, 4, 4), (64, 64, 4, 3),
             (16, 64, 4, 3), (32, 32, 4, 3), (64, 32, 4, 3), (64, 128, 8, 2), (16, 128, 8, 3), (32, 128, 8, 4),
             (32, 128, 4, 2)],
    "dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (64, 128, 4, 2), (64, 32, 4, 3),
           (32, 64, 4, 3)],
    "own_dq": [(64, 32, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (64, 128, 4, 2),
               (32, 64, 4, 3)],
}
# the run.py cases a kind is judged by, and those timed before and after the best configs are applied together
JUDGE = {"gate": ["fwd32k"], "fwd": ["fwd8k", "fwd128k"], "own": ["fwd8k", "fwd32k"], "dkdv": ["fb32k"],
         "dq": ["fb32k"], "own_dq": ["fb32k"]}
FINAL = ["fwd8k", "fb32k"]
BACKEND = "triton"


def case_fn(name):
    """One MoBA call of a run.py case (its shapes, bf16) on the Triton kernels."""
    c = run.CASES[name]
    q, k, v, do = run.inputs(c, "cuda", torch.bfloat16)
    return step(lambda a, b, d: moba.moba_attention(a, b, d, c.block_size, c.topk, backend=BACKEND), q, k, v, do)


def case_ms(name):
    return time_ms(case_fn(name), "cuda", repeats=2)


def kernel_ms(kind, name, n=5):
    """GPU time of the kind's kernels per call (all their launches), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    fn = case_fn(name)
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as pr:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in pr.key_averages() if e.key in KERNELS[kind][1]) / n / 1e3


def compiled_regs(kind):
    """Registers and spilled registers of the kind's kernel as last compiled (the config just run)."""
    mod, names = KERNELS[kind]
    kern = [k for n in names for cache in getattr(mod, n).device_caches.values() for k in cache[0].values()]
    return (kern[-1].n_regs, kern[-1].n_spills) if kern else (None, None)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default=",".join(CANDIDATES))
    p.add_argument("--kernel-times", action="store_true", help="judge by the kernels' GPU time (profiler)")
    p.add_argument("--configs", default=None,
                   help="configs to try instead of the built-in list, e.g. '32,128,8,3;32,128,16,3' (one kind)")
    p.add_argument("--out", default=None, help="append the JSON line here instead of benchmarks/results/tune.jsonl")
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    if a.configs and a.kinds not in CANDIDATES:
        p.error(f"--configs needs one kind in --kinds (one of {', '.join(CANDIDATES)}), got {a.kinds!r}")
    if a.configs:
        CANDIDATES[a.kinds] = [tuple(int(x) for x in c.split(",")) for c in a.configs.split(";")]
    best, log = {}, []
    for kind in a.kinds.split(","):
        res, ref = [], None
        first = configs.GPU_DEFAULT[kind]    # the current config first: --kernel-times ranks relative to it
        tried = CANDIDATES[kind] if a.configs else [first] + [c for c in CANDIDATES[kind] if c != first]
        for c in tried:
            configs.CONFIG[kind] = c
            try:
                ms = [kernel_ms(kind, n) if a.kernel_times else case_ms(n) for n in JUDGE[kind]]
            except Exception as e:   # noqa: BLE001 -- a config that does not compile (shared memory) is skipped
                print(f"{kind} {c}: failed: {str(e).splitlines()[0][:100]}", flush=True)
                continue
            ref = ref or ms
            res.append((sum(m / r for m, r in zip(ms, ref)) / len(ms) if a.kernel_times else sum(ms), c))
            regs, spills = compiled_regs(kind)
            log.append(dict(kind=kind, config=c, cases=JUDGE[kind], ms=ms, regs=regs, spills=spills))
            print(f"{kind} {c}: " + " / ".join(f"{m:.3f}" for m in ms) + " ms"
                  + (f"  (relative {res[-1][0]:.3f})" if a.kernel_times else "")
                  + f"  regs {regs} spills {spills}", flush=True)
        configs.CONFIG[kind] = None
        if res:
            best[kind] = min(res)[1]
            print(f"best {kind}: {best[kind]}", flush=True)
    print("\nbest per kind:", best)
    before = {n: case_ms(n) for n in FINAL}
    configs.CONFIG.update(best)
    after = {n: case_ms(n) for n in FINAL}
    for n in FINAL:
        print(f"{n}: GPU_DEFAULT {before[n]:.3f} ms -> best configs {after[n]:.3f} ms")
    if not a.no_record:
        append_jsonl(a.out or run.RESULTS / "tune.jsonl", [dict(
            tool="tune", commit=source_commit(), card=torch.cuda.get_device_name(), **versions(), backend=BACKEND,
            kernel_times=a.kernel_times, gpu_default=configs.GPU_DEFAULT, best=best, log=log, before=before,
            after=after, command=" ".join(["python", "benchmarks/tools/tune.py", *sys.argv[1:]]),
            timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))])


if __name__ == "__main__":
    main()
