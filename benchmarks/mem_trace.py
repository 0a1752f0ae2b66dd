"""Which allocations make up the peak of one MoBA call on a GPU (torch's CUDA allocator history).

    python benchmarks/mem_trace.py --T 8192 --block 4096 --topk 12 [--grad]

Prints the tensors alive at the call's peak that the call allocated, largest first, with the line of
`moba/` that allocated each. Shapes as bench_kernels (bf16, 32/8 heads, D 128).
"""
from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
sys.path.insert(0, __file__.rsplit("/", 1)[0])
import moba  # noqa: E402
from bench_kernels import make, step  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--topk", type=int, default=12)
    p.add_argument("--grad", action="store_true")
    a = p.parse_args()
    q, k, v = make(a.T, 32, 8, 128, torch.bfloat16, a.grad)
    fn = step(lambda x, y, z: moba.moba_attention(x, y, z, a.block, a.topk), q, k, v, a.grad)
    fn()                                   # compile, fill caches
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    fn()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live, cur, best, at_peak = {}, 0, 0, {}
    for ev in snap["device_traces"][0]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            cur += ev["size"]
        elif ev["action"] == "free_requested" and ev["addr"] in live:
            cur -= live.pop(ev["addr"])["size"]
        if cur > best:
            best, at_peak = cur, dict(live)
    print(f"T={a.T} block={a.block} topk={a.topk} grad={a.grad}: peak {best / 2**20:.1f} MiB allocated by the call")
    for ev in sorted(at_peak.values(), key=lambda e: -e["size"])[:15]:
        fr = [f for f in ev.get("frames", []) if "/moba/" in f["filename"]]
        where = f"{fr[0]['filename'].split('/moba/')[-1]}:{fr[0]['line']} {fr[0]['name']}" if fr else "?"
        print(f"  {ev['size'] / 2**20:9.1f} MiB  {where}")


if __name__ == "__main__":
    main()
