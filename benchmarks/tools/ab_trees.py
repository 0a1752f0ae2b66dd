"""The same MoBA cases timed on two or more source trees, alternately, in one run on one GPU: how a change that
should not move speed (a refactor) is checked, and how an optimisation is measured against its base.

Each tree runs in its own process (it imports ``moba`` from that tree), round after round, so that drift of the
machine hits every tree alike. Prints the median ms and peak memory per tree and case, and the ratio of each tree
to the first; ``--out`` appends the rows as JSONL. The cases are benchmarks/run.py's (batch 1, 32 / 8 heads of 128).

    git worktree add /tmp/base <commit>
    python benchmarks/tools/ab_trees.py --tree base=/tmp/base --tree new=. --cases fwd8k,fb32k --rounds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))     # benchmarks/: the case registry
import run  # noqa: E402


def shape(name):
    """(T, block, topk, forward and backward; None for one query against T keys) of a run.py case; the children
    run it in bf16, batch 1, 32 query / 8 kv heads, head dim 128 (run.py's kernel cases)."""
    c = run.CASES[name]
    if c.batch != 1 or (c.heads, c.kv_heads, c.head_dim) != (32, 8, 128) or c.lengths:
        raise ValueError(f"ab_trees runs batch-1 cases with 32/8 heads of 128 and one length; {name} is not one")
    return c.T, c.block_size, c.topk, None if c.decode else c.fwd_bwd


CHILD = r"""
import cProfile, json, pstats, sys, time
sys.path.insert(0, sys.argv[1])
PROFILE = sys.argv[3] == "1"
import torch, triton.testing
import moba
for T, bs, topk, fb in json.loads(sys.argv[2]):
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    Tq = 1 if fb is None else T
    q = torch.randn(1, Tq, 32, 128, device=dev, dtype=dt, requires_grad=bool(fb))
    k, v = (torch.randn(1, T, 8, 128, device=dev, dtype=dt, requires_grad=bool(fb)) for _ in range(2))
    do = torch.randn_like(q)
    def run():
        if fb:
            for x in (q, k, v):
                x.grad = None
            torch.autograd.backward(moba.moba_attention(q, k, v, bs, topk), do)
        else:
            with torch.no_grad():
                moba.moba_attention(q, k, v, bs, topk)
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
    # eager calls back to back (no cache flush between them): the host's time to issue one, and the wall time
    n = 50
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        run()
    issue = (time.perf_counter() - t) / n * 1e3
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / n * 1e3
    if PROFILE:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(n):
            run()
        pr.disable()
        torch.cuda.synchronize()
        pstats.Stats(pr).sort_stats("tottime").print_stats(15)
    print(json.dumps(dict(ms=ms, peak=peak, issue_ms=issue, wall_ms=wall)), flush=True)
    del q, k, v, do
    torch.cuda.empty_cache()
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree (repeat)")
    p.add_argument("--cases", default="fwd8k,fb32k,fwd512k,fwd1m,fb512k_b128,decode1m")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="append one JSON line per (tree, case)")
    p.add_argument("--profile", action="store_true", help="print each child's cProfile of 50 eager calls per case "
                   "(the first round)")
    a = p.parse_args()
    trees = [t.split("=", 1) for t in a.tree]
    res = {(n, c): [] for n, _ in trees for c in a.cases.split(",")}
    cases = a.cases.split(",")
    for i in range(a.rounds):     # one process per tree and round: every case, in order
        for n, path in trees:
            r = subprocess.run([sys.executable, "-c", CHILD, path, json.dumps([shape(c) for c in cases]),
                                "1" if a.profile and i == 0 else "0"], capture_output=True, text=True)
            if a.profile and i == 0:
                print(f"--- {n}: cProfile of 50 eager calls per case ({', '.join(cases)})\n"
                      + "\n".join(x for x in r.stdout.splitlines() if not x.startswith("{")), flush=True)
            lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
            if r.returncode:
                print(f"{n}: failed after {len(lines)} cases\n{r.stderr[-2000:]}", flush=True)
            for c, x in zip(cases, lines):
                res[(n, c)].append(x)
    import torch
    card = torch.cuda.get_device_name()
    print(f"{card}; bf16, batch 1, 32/8 heads, D 128; median of {a.rounds} rounds (each do_bench's median)")
    print(f"{'case':12s} " + " ".join(f"{n + ' ms':>12s} {n + ' MiB':>10s}" for n, _ in trees) + "  ratio to first")
    for c in a.cases.split(","):
        row, first = [], None
        for n, _ in trees:
            rs = res[(n, c)]
            ms = statistics.median(r["ms"] for r in rs) if rs else float("nan")
            mb = max(r["peak"] for r in rs) / 2**20 if rs else float("nan")
            first = ms if first is None else first
            row.append((n, ms, mb))
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(dict(tool="ab_trees", card=card, case=c, tree=n, path=dict(trees)[n],
                                            shape=shape(c), ms=ms, ms_rounds=[r["ms"] for r in rs],
                                            issue_ms_rounds=[r.get("issue_ms") for r in rs],
                                            wall_ms_rounds=[r.get("wall_ms") for r in rs],
                                            peak_bytes=max((r["peak"] for r in rs), default=None))) + "\n")
        print(f"{c:12s} " + " ".join(f"{ms:12.3f} {mb:10.1f}" for _, ms, mb in row) + "  "
              + " ".join(f"{ms / first:.3f}" for _, ms, _ in row[1:]), flush=True)
        print(f"{'':12s} eager back to back, issue / wall ms per call: " + "; ".join(
            f"{n} {statistics.median(r['issue_ms'] for r in res[(n, c)]):.3f} / "
            f"{statistics.median(r['wall_ms'] for r in res[(n, c)]):.3f}" for n, _ in trees if res[(n, c)]), flush=True)


if __name__ == "__main__":
    main()
