"""MoBA Triton kernels vs the fastest dense attention (SDPA cuDNN / flash) on one GPU.

Prints a table and writes JSON. Shapes default to the issue's: bf16, batch 1, 32 query heads, 8 KV heads,
head dim 128, causal. Dense timings depend only on T, so each length is timed once per run and shared.

    python benchmarks/bench_kernels.py --cases fwd8k,fb32k --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import triton
from torch.nn.attention import SDPBackend

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
import moba  # noqa: E402
from moba.bench import cuda_graph, dense_causal, pair_fraction, peak_bytes, profile_call, source_commit  # noqa: E402
from moba.ops.utils import validate, pack  # noqa: E402

K, M = 1024, 1024 * 1024
CASES = {  # name: (T, block, topk, fwd_bwd)
    "fwd8k": (8 * K, 512, 3, False),
    "fb32k": (32 * K, 512, 3, True),
    "fwd512k": (512 * K, 4096, 12, False),
    "fwd1m": (M, 4096, 12, False),
    "fb512k": (512 * K, 128, 8, True),
    "fb1m": (M, 4096, 12, True),       # the 80 GB fit check of the kernels issue (try with --dense "")
    "fwd32k": (32 * K, 512, 3, False),
    "fb8k": (8 * K, 512, 3, True),
    "fwd128k": (128 * K, 4096, 12, False),
    "fb128k": (128 * K, 512, 3, True),
}
for _T in (8 * K, 32 * K, 128 * K, 512 * K, M):
    CASES[f"sweep4096_{_T // K}k"] = (_T, 4096, 12, False)
    CASES[f"sweep512_{_T // K}k"] = (_T, 512, 3, False)


def timeit(fn, long=False):
    """Median ms (do_bench); long calls: one warm-up, then the mean of 2 timed calls with CUDA events."""
    if not long:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    ts = []
    for _ in range(2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sum(ts) / len(ts)


def peak(fn):
    return peak_bytes(fn, torch.device("cuda")) / 2**30


def make(T, H, Hkv, D, dtype, grad):
    torch.manual_seed(0)
    xs = [torch.randn(1, T, h, D, device="cuda", dtype=dtype) for h in (H, Hkv, Hkv)]
    return [x.requires_grad_(grad) for x in xs]


def step(f, q, k, v, fwd_bwd):
    if not fwd_bwd:
        def run():
            with torch.no_grad():
                f(q, k, v)
        return run
    do = torch.randn(q.shape, device=q.device, dtype=q.dtype)

    def run():
        for x in (q, k, v):
            x.grad = None
        torch.autograd.backward(f(q, k, v), do)
    return run


def dense_fn(backend):
    return lambda q, k, v: dense_causal(q, k, v, backend)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="fwd8k,fb32k")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dense", default="cudnn,flash", help="dense backends to time ('' for none)")
    p.add_argument("--flash-max", type=int, default=128 * K, help="time the flash backend up to this T")
    p.add_argument("--json", default=None)
    p.add_argument("--graph", action="store_true",
                   help="forward cases under 256K: also time MoBA and the dense backends replayed from a CUDA graph")
    p.add_argument("--profile", action="store_true",
                   help="per MoBA case: host time per call and the GPU kernels' share (torch.profiler)")
    a = p.parse_args()
    H, Hkv, D, dt = a.heads, a.kv_heads, a.head_dim, torch.bfloat16
    commit = source_commit()
    from moba.ops import parallel
    # which kernels ran: the switches of moba/ops/parallel.py (environment variables MOBA_*)
    switches = {n: getattr(parallel, n) for n in dir(parallel) if n.endswith("_GLUON") or n.startswith(("GLUON_", "GATE_"))}
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               date=time.strftime("%Y-%m-%d"), commit=commit, dtype="bf16", heads=H, kv_heads=Hkv, head_dim=D,
               switches=switches)
    print(env, flush=True)
    dense_cache, rows = {}, []
    for name in a.cases.split(","):
        T, bs, topk, fb = CASES[name]
        long = T >= 256 * K
        q, k, v = make(T, H, Hkv, D, dt, fb)
        row = dict(case=name, T=T, block=bs, topk=topk, fwd_bwd=fb, frac_pairs=pair_fraction(T, bs, topk))
        for dn in [d for d in a.dense.split(",") if d and (d != "flash" or T <= a.flash_max)]:
            key = (dn, T, fb)
            if key not in dense_cache:
                be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[dn]
                try:
                    fn = step(dense_fn(be), q, k, v, fb)
                    dense_cache[key] = (timeit(fn, long), peak(fn),
                                        timeit(cuda_graph(fn)[0]) if a.graph and not (fb or long) else float("nan"))
                except RuntimeError as e:
                    print(f"  {dn} failed at T={T}: {str(e).splitlines()[0][:120]}", flush=True)
                    dense_cache[key] = (float("nan"),) * 3
                torch.cuda.empty_cache()
            row[f"{dn}_ms"], row[f"{dn}_peak_gib"], g_ms = dense_cache[key]
            if g_ms == g_ms:
                row[f"{dn}_graph_ms"] = g_ms
        fn = step(lambda a_, b_, c_: moba.moba_attention(a_, b_, c_, bs, topk), q, k, v, fb)
        row["moba_ms"] = timeit(fn, long)
        row["moba_peak_gib"] = peak(fn)
        dense = [row[f"{d}_ms"] for d in a.dense.split(",") if f"{d}_ms" in row and row[f"{d}_ms"] == row[f"{d}_ms"]]
        row["best_dense_ms"] = min(dense) if dense else float("nan")
        row["speedup"] = row["best_dense_ms"] / row["moba_ms"]
        if a.graph and not (fb or long):
            row["moba_graph_ms"] = timeit(cuda_graph(fn)[0])   # no host work: the kernels alone
            g_dense = [row[f"{d}_graph_ms"] for d in a.dense.split(",") if f"{d}_graph_ms" in row]
            row["speedup_graph"] = min(g_dense) / row["moba_graph_ms"] if g_dense else float("nan")
        flops = 4 * D * H * row["frac_pairs"] * T * (T + 1) / 2 * (3.5 if fb else 1.0)
        row["moba_eff_tflops"] = flops / row["moba_ms"] / 1e9
        if not fb:   # the gate alone: block means + the Triton top-k kernel
            from moba.ops import parallel
            with torch.no_grad():
                lay, _ = validate(q, k, v, bs, topk)
                lt = lay.tensors(q.device)
                qp, kp = pack(q), pack(k)
                row["gate_ms"] = timeit(lambda: parallel.select_past_blocks(qp, kp, lay, lt, topk), long)
        if a.profile and not long:
            row.update(profile_call(fn))
        rows.append(row)
        print({k_: (round(v_, 3) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
        del q, k, v, fn
        torch.cuda.empty_cache()
    print()
    print("| case | T | block/topk | pass | cuDNN ms | flash ms | MoBA ms | speedup vs best | MoBA eff TFLOP/s "
          "| gate ms | peak GiB cuDNN / MoBA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['T']} | {r['block']}/{r['topk']} | {'fwd+bwd' if r['fwd_bwd'] else 'fwd'} | "
              f"{r.get('cudnn_ms', float('nan')):.2f} | {r.get('flash_ms', float('nan')):.2f} | {r['moba_ms']:.2f} | "
              f"{r['speedup']:.2f}x | {r['moba_eff_tflops']:.0f} | {r.get('gate_ms', float('nan')):.2f} | "
              f"{r.get('cudnn_peak_gib', float('nan')):.2f} / {r['moba_peak_gib']:.2f} |")
    if any("moba_graph_ms" in r for r in rows):
        print()
        print("| case | cuDNN graph ms | flash graph ms | MoBA graph ms | speedup (graphs) |")
        print("|---|---|---|---|---|")
        for r in rows:
            if "moba_graph_ms" in r:
                print(f"| {r['case']} | {r.get('cudnn_graph_ms', float('nan')):.3f} | "
                      f"{r.get('flash_graph_ms', float('nan')):.3f} | {r['moba_graph_ms']:.3f} | "
                      f"{r['speedup_graph']:.2f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
