"""Context parallelism benchmark: one attention layer, forward + backward, over a sequence sharded across the GPUs
of one host, launched by torchrun:

    torchrun --nproc-per-node 4 benchmarks/cp.py --lengths 262144,1048576 --block 4096 --topk 12

For each length: moba.distributed.moba_attention per scheme and layout; on one GPU also plain moba.moba_attention
in the same process (the P = 1 path must cost no more); with several GPUs PyTorch's own context parallelism for
SDPA (torch.distributed.tensor.experimental.context_parallel), the dense alternative a user would pick. Prints a
table on rank 0 (time is the slowest rank's median, peak memory the largest rank's) and appends JSONL rows to
benchmarks/results/cp.jsonl (``--out``). bf16, batch 1, 32 query / 8 kv heads, head dim 128 by default.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
import moba  # noqa: E402
import moba.distributed as md  # noqa: E402
from moba.bench import source_commit  # noqa: E402


def _time(fn, reps):
    """Median ms over ``reps`` calls after one warm-up, every rank synchronised around each call."""
    fn()
    ts = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def _peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _fwd_bwd(attn, xs, do):
    def run():
        for x in xs:
            x.grad = None
        torch.autograd.backward(attn(*xs), do)
    return run


def _slowest(x):
    t = torch.tensor([float(x)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="262144")
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--topk", type=int, default=12)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--schemes", default="allgather,ulysses")
    p.add_argument("--layouts", default="zigzag")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-dense", action="store_true", help="skip PyTorch's context-parallel SDPA")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cp.jsonl"))
    a = p.parse_args()
    dist.init_process_group("nccl")
    rank, P = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dt = torch.bfloat16
    rows = []
    for T in (int(x) for x in a.lengths.split(",")):
        n = T // P
        g = torch.Generator(device="cuda").manual_seed(0)
        shapes = [(a.heads, a.head_dim), (a.kv_heads, a.head_dim), (a.kv_heads, a.head_dim)]
        base = dict(T=T, P=P, block=a.block, topk=a.topk, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim,
                    dtype="bf16", card=torch.cuda.get_device_name(), commit=source_commit(),
                    torch=torch.__version__, command=" ".join(sys.argv))
        variants = []
        for layout in a.layouts.split(","):
            for scheme in a.schemes.split(","):
                if scheme == "ulysses" and a.kv_heads % P:
                    continue
                variants.append((f"moba-{scheme}-{layout}", layout, lambda q, k, v, s=scheme, lo=layout:
                                 md.moba_attention(q, k, v, a.block, a.topk, layout=lo, scheme=s)))
        if P == 1:
            variants.append(("moba-single", "contiguous", lambda q, k, v: moba.moba_attention(q, k, v, a.block, a.topk)))
        for name, layout, attn in variants:
            xs = [torch.randn(1, n, h, d, device="cuda", dtype=dt, generator=g).requires_grad_() for h, d in shapes]
            do = torch.randn(1, n, a.heads, a.head_dim, device="cuda", dtype=dt, generator=g)
            run = _fwd_bwd(attn, xs, do)
            try:
                ms, peak = _time(run, a.reps), _peak(run)
                rows.append(dict(base, variant=name, layout=layout, ms=_slowest(ms), peak_bytes=_slowest(peak)))
            except torch.cuda.OutOfMemoryError:
                rows.append(dict(base, variant=name, layout=layout, ms=None, error="out of memory"))
            _report(rows[-1], a, len(rows) == 1)
            del xs, do, run
            torch.cuda.empty_cache()
        if P > 1 and not a.no_dense:
            rows.append(dict(base, variant="sdpa-torch-cp", layout="round-robin", **_torch_cp(T, a, P, dt)))
            _report(rows[-1], a, False)
    dist.destroy_process_group()


def _report(r, a, first):
    """Rank 0 prints and appends each row as it is measured (a run cut short keeps what it measured)."""
    if dist.get_rank():
        return
    if first:
        print(f"{r['card']} x{r['P']}; bf16, {a.heads}/{a.kv_heads} heads, D {a.head_dim}; block {a.block} topk "
              f"{a.topk}; forward+backward of one layer; commit {r['commit']}", flush=True)
    ms = f"{r['ms']:10.1f} ms" if r.get("ms") else f"{r.get('error', 'n/a'):>13s}"
    pk = f"{r['peak_bytes'] / 2**30:7.2f} GiB" if r.get("peak_bytes") else ""
    print(f"T={r['T']:>8d}  {r['variant']:28s} {ms} {pk}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(r) + "\n")


def _torch_cp(T, a, P, dt):
    """PyTorch's context parallelism for SDPA (causal, its round-robin load balancing), forward + backward."""
    try:
        import torch.nn.functional as F
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        mesh = init_device_mesh("cuda", (P,))
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, a.heads, T, a.head_dim, device="cuda", dtype=dt, generator=g)
        k, v = (torch.randn(1, a.kv_heads, T, a.head_dim, device="cuda", dtype=dt, generator=g) for _ in range(2))
        do = torch.randn_like(q)

        def run():
            qq, kk, vv, dd = (x.clone() for x in (q, k, v, do))
            with context_parallel(mesh, buffers=[qq, kk, vv, dd], buffer_seq_dims=[2, 2, 2, 2]):
                for x in (qq, kk, vv):
                    x.requires_grad_()
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
                torch.autograd.backward(o, dd)
        return dict(ms=_slowest(_time(run, a.reps)), peak_bytes=_slowest(_peak(run)))
    except Exception as e:      # recorded, not fatal: the MoBA rows stand on their own
        return dict(ms=None, error=f"{type(e).__name__}: {str(e)[:200]}")


if __name__ == "__main__":
    main()
