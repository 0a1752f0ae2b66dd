"""Which allocations make up the peak of one MoBA call on a GPU (torch's CUDA allocator history): for finding what
to free or shrink when ``run.py`` reports MoBA's peak memory above dense attention's.

    python benchmarks/tools/mem_trace.py [--case fwd8k] [--block-size 4096 --topk 12] [--backend auto]

Prints the tensors alive at the call's peak that the call allocated, largest first, with the line of ``moba/``
that allocated each. A forward-and-backward case traces both passes.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))     # benchmarks/: the case registry
import run  # noqa: E402

import moba  # noqa: E402
from moba.bench import step  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="fwd8k", help="an attention case of benchmarks/run.py")
    p.add_argument("--T", type=int, default=None, help="override the case's length")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--topk", type=int, default=None)
    p.add_argument("--backend", default="auto")
    a = p.parse_args()
    c = run.case(a.case, T=a.T, block_size=a.block_size, topk=a.topk)
    q, k, v, do = run.inputs(c, "cuda", torch.bfloat16)
    fn = step(lambda x, y, z: moba.moba_attention(x, y, z, c.block_size, c.topk, backend=a.backend), q, k, v, do)
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
    print(f"{c.name} ({c.mode}) T={c.T} block={c.block_size} topk={c.topk} backend={a.backend}: "
          f"peak {best / 2**20:.1f} MiB allocated by the call")
    for ev in sorted(at_peak.values(), key=lambda e: -e["size"])[:15]:
        fr = [f for f in ev.get("frames", []) if "/moba/" in f["filename"]]
        where = f"{fr[0]['filename'].split('/moba/')[-1]}:{fr[0]['line']} {fr[0]['name']}" if fr else "?"
        print(f"  {ev['size'] / 2**20:9.1f} MiB  {where}")


if __name__ == "__main__":
    main()
