"""Where the persistent Gluon forward's consumers spend their cycles (a timing build of
`gluon_fwd_ws.sparse_fwd_ws_persistent_kernel` with PF: SM cycle counters read between the phases of each tile):

    python benchmarks/ws_phases.py [--cases fwd8k,fwd32k] [--json out.json]

Per slot launch, summed over each consumer warpgroup's tiles: cycles per tile of each phase (`PHASES`), averaged
over warpgroups. The results stay right; the counters cost a few instructions per tile and the timing build
spills a few registers (ptxas: ~20 bytes), so its total is a little above the plain kernel's. With
MOBA_GLUON_WS_QE=1, the early-Q consumers' phases (`QE_PHASES`).
"""
import argparse
import json

import torch

import moba
from bench_kernels import make   # the benchmarks' inputs (seed 0), this directory being on the path
from moba.ops import parallel

PHASES = ["O copies issued", "rows to merge layout, LSE load", "Q wait", "key loop", "next rows, Q copies issued",
          "O wait and read", "merge arithmetic", "stores"]
# with QE (`parallel.GLUON_WS_QE`, `gluon_fwd_ws._consumer_qe`)
QE_PHASES = ["LSE, ids and table loads issued", "O and next Q copies issued", "Q wait", "key loop", "O wait and read",
             "merge arithmetic", "stores", "next tile's values"]
CASES = {"fwd8k": (8192, 512, 3), "fwd32k": (32768, 512, 3), "fwd128k": (131072, 4096, 12)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="fwd8k,fwd32k")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    phases = QE_PHASES if parallel.GLUON_WS_QE == "1" else PHASES
    for name in a.cases.split(","):
        T, bs, topk = CASES[name]
        q, k, v = make(T, 32, 8, 128, torch.bfloat16, False)
        ref = moba.moba_attention(q, k, v, bs, topk)
        parallel.WS_TIME = torch.full((topk - 1, sms, 2, 9), -1, dtype=torch.int64, device="cuda")
        for _ in range(3):
            out = moba.moba_attention(q, k, v, bs, topk)
        torch.cuda.synchronize()
        tb = parallel.WS_TIME.cpu()
        parallel.WS_TIME = None
        assert torch.equal(out, ref), "the timing build changed the output"
        for s in range(topk - 1):
            t = tb[s][tb[s, :, :, 8] > 0].double()          # warpgroups that ran tiles: [n, 9]
            per_tile = t[:, :8].sum(0) / t[:, 8].sum()
            row = dict(case=name, slot=s, warpgroups=int(t.shape[0]), tiles_per_wg=float(t[:, 8].mean()),
                       cycles=float(t[:, :8].sum(1).mean()), cycles_max=float(t[:, :8].sum(1).max()),
                       per_tile=dict(zip(phases, (float(x) for x in per_tile))))
            rows.append(row)
            print(f"{name} slot {s}: {row['warpgroups']} warpgroups, {row['tiles_per_wg']:.1f} tiles each, "
                  f"{row['cycles']:.0f} cycles (max {row['cycles_max']:.0f}); per tile "
                  f"{float(per_tile.sum()):.0f} cycles: " + ", ".join(f"{p} {x:.0f}" for p, x in
                                                                      row["per_tile"].items()))
    if a.json:
        json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows), open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
