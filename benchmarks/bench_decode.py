"""One decode step's attention: MoBA over a KV cache vs SDPA over the same cache.

    python benchmarks/bench_decode.py --lengths 131072,1048576 --json out.json     # on a GPU
    python benchmarks/bench_decode.py --device cpu --lengths 8192 --heads 4 --kv-heads 2 --head-dim 64

B=1 rows time a single query against T cached keys (block means kept by a BlockMeansCache, as during
generation: the steady-state step pools nothing). The batch row packs 16 sequences of mixed cache
lengths (cu_seqlens / cu_seqlens_k, given as CPU tensors), one query each, with one BlockMeansCache for the batch (also timed
without it: every cached key re-pooled), against SDPA on the same padded batch.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
sys.path.insert(0, __file__.rsplit("/", 1)[0])
import moba  # noqa: E402
from moba.bench import profile_call, source_commit  # noqa: E402
from moba.ops import decode  # noqa: E402


def both_paths(fn, device):
    """Time fn with the general kernels and with the one-launch decode kernel (moba.ops.decode)."""
    res, before = {}, decode.ENABLED_ON_CUDA
    for name, flag in (("moba_general_ms", False), ("moba_decode_kernel_ms", True)):
        decode.ENABLED_ON_CUDA = flag
        res[name] = bench(fn, device)
    decode.ENABLED_ON_CUDA = before
    res["moba_ms"] = min(res["moba_general_ms"], res["moba_decode_kernel_ms"])
    return res


def bench(fn, device):
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[2]


def profiled(fn, device, on: bool) -> dict:
    """With --profile on CUDA: moba.bench.profile_call of the decode kernel's path."""
    if not on or device.type != "cuda":
        return {}
    before, decode.ENABLED_ON_CUDA = decode.ENABLED_ON_CUDA, True
    try:
        return profile_call(fn)
    finally:
        decode.ENABLED_ON_CUDA = before


def peak(fn, device):
    if device.type != "cuda":
        return float("nan")
    from bench_kernels import peak as peak_gib
    return peak_gib(fn) * 1024


def sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask, enable_gqa=True).transpose(1, 2)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="131072,1048576")
    p.add_argument("--batch-lengths", default="1024,4096,16384,65536,131072,2048,8192,32768,"
                                              "100000,3000,50000,7000,250000,12000,600,70000")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--topk", type=int, default=12)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--profile", action="store_true", help="host time per step and the GPU kernels (CUDA)")
    a = p.parse_args()
    dev = torch.device(a.device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    H, Hkv, D, bs, topk = a.heads, a.kv_heads, a.head_dim, a.block_size, a.topk
    commit = source_commit()
    env = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__,
               date=time.strftime("%Y-%m-%d"), commit=commit, dtype=str(dt), heads=H, kv_heads=Hkv,
               head_dim=D, block=bs, topk=topk)
    print(env, flush=True)
    rows = []
    with torch.no_grad():
        for T in [int(x) for x in a.lengths.split(",") if x]:
            torch.manual_seed(0)
            q = torch.randn(1, 1, H, D, device=dev, dtype=dt)
            k = torch.randn(1, T, Hkv, D, device=dev, dtype=dt)
            v = torch.randn(1, T, Hkv, D, device=dev, dtype=dt)
            cache = moba.BlockMeansCache()
            cache.means(k[0, :T - 1], bs)            # the cache as generation leaves it
            step = lambda: moba.moba_attention(q, k, v, bs, topk, means_cache=cache)  # noqa: E731
            dense = lambda: sdpa(q, k, v)  # noqa: E731
            r = dict(case="B=1", T=T, sdpa_ms=bench(dense, dev), **both_paths(step, dev),
                     sdpa_peak_mib=peak(dense, dev), moba_peak_mib=peak(step, dev))
            ref = sdpa(q, k, v) if T <= bs * topk else None
            if ref is not None:   # every block selected: MoBA must equal dense attention
                r["max_abs_diff_vs_sdpa"] = (step().float() - ref.float()).abs().max().item()
            r["speedup"] = r["sdpa_ms"] / r["moba_ms"]
            r.update(profiled(step, dev, a.profile))
            rows.append(r)
            print(r, flush=True)
            del k, v
        lens = [int(x) for x in a.batch_lengths.split(",") if x]
        torch.manual_seed(0)
        Tk = sum(lens)
        q = torch.randn(1, len(lens), H, D, device=dev, dtype=dt)
        k = torch.randn(1, Tk, Hkv, D, device=dev, dtype=dt)
        v = torch.randn(1, Tk, Hkv, D, device=dev, dtype=dt)
        cu_q = torch.arange(len(lens) + 1, dtype=torch.int32)                 # host offsets: no device sync
        cu_k = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        cache = moba.BlockMeansCache()                # the caches as generation leaves them
        cache.means(k[0], bs, cu_k.tolist())         # (the timed steps complete no new block)
        step = lambda: moba.moba_attention(q, k, v, bs, topk, cu_seqlens=cu_q, cu_seqlens_k=cu_k,  # noqa: E731
                                           means_cache=cache)
        repool = lambda: moba.moba_attention(q, k, v, bs, topk, cu_seqlens=cu_q, cu_seqlens_k=cu_k)  # noqa: E731
        # SDPA on the padded batch [B, max_len] with a key padding mask
        L = max(lens)
        kb = torch.zeros(len(lens), L, Hkv, D, device=dev, dtype=dt)
        vb = torch.zeros_like(kb)
        mask = torch.zeros(len(lens), 1, 1, L, dtype=torch.bool, device=dev)
        for i, n in enumerate(lens):
            kb[i, L - n:] = k[0, int(cu_k[i]):int(cu_k[i + 1])]
            vb[i, L - n:] = v[0, int(cu_k[i]):int(cu_k[i + 1])]
            mask[i, ..., L - n:] = True
        qb = q[0][:, None]
        dense = lambda: sdpa(qb, kb, vb, mask)  # noqa: E731
        r = dict(case=f"B={len(lens)} mixed", T=Tk, sdpa_ms=bench(dense, dev), **both_paths(step, dev),
                 moba_repool_ms=bench(repool, dev),
                 sdpa_peak_mib=peak(dense, dev), moba_peak_mib=peak(step, dev), lengths=lens)
        r["speedup"] = r["sdpa_ms"] / r["moba_ms"]
        r.update(profiled(step, dev, a.profile))
        rows.append(r)
        print(r, flush=True)
    print("\n| case | cached tokens | SDPA ms | MoBA ms general / decode kernel | speedup (best) "
          "| peak MiB SDPA / MoBA | MoBA ms without means cache |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['T']} | {r['sdpa_ms']:.3f} | {r['moba_general_ms']:.3f} / "
              f"{r['moba_decode_kernel_ms']:.3f} | {r['speedup']:.2f}x | "
              f"{r['sdpa_peak_mib']:.0f} / {r['moba_peak_mib']:.0f} | "
              + (f"{r['moba_repool_ms']:.3f} |" if "moba_repool_ms" in r else "- |"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
