"""Decode steps through ``moba.moba_attention_with_kvcache`` against dense decoding, eager and as CUDA graphs.

Each case is one step of every sequence: one new query, its key and value appended to the cache (and to the key
sums), attention over the cache. MoBA reads a contiguous cache [B, Tmax, Hkv, D] or a paged one (pages shuffled
in the pool, as an engine's allocator leaves them); dense attention reads each sequence's keys in place (SDPA's
kernels for one sequence; for a batch of mixed lengths FlashAttention's varlen kernel through PyTorch and SDPA per
sequence). Reported per case: ms eager and per graph replay, the host's time to issue one eager step, the speedup
over the fastest dense in the same mode, and the byte bound: dense bytes over the bytes MoBA must read given the
selection it made (union of the blocks chosen by a kv head's query heads, plus the key sums it scores), with the
share of that bound reached. bf16, 32 query / 8 kv heads, D 128, block 4096, topk 12 unless told.

    python benchmarks/kvcache.py [--cases b1_1m,b1_128k,b8_paged] [--tree PATH] [--out FILE]

``--tree`` imports ``moba`` from another source tree (a before/after comparison in one call); ``--decode-configs``
also times each case's step (as a graph) under other launch configs of the decode kernel.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import warnings

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--cases", default="b1_1m,b1_128k,b8_paged")
ap.add_argument("--tree", default=None, help="source tree to import moba from (default: this one)")
ap.add_argument("--block", type=int, default=4096)
ap.add_argument("--topk", type=int, default=12)
ap.add_argument("--page", type=int, default=256)
ap.add_argument("--gate", default="head", choices=("head", "group"),
                help="'group': the variant whose query heads of a kv head choose together (moba_attention's gate)")
ap.add_argument("--label", default="", help="a name for the tree in the rows")
ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "kvcache.jsonl"),
                help="append one JSON line per case")
ap.add_argument("--decode-configs", default="",
                help="also time the step's graph under these decode launch configs (moba.triton.configs.CONFIG"
                     "['decode'], whose comment says what each field is; a shorter one takes the rest from the "
                     "default): 'per_sm:max_splits:bn:warps:stages:chunk:listed:gate_chunk:replace:gate_programs,...'")
ap.add_argument("--profile", action="store_true",
                help="CUDA: the step's GPU time per kernel and its host time (moba.bench.profile_call)")
ap.add_argument("--smoke", action="store_true", help="a small case that runs anywhere (checks this script)")
A = ap.parse_args()
sys.path.insert(0, os.path.abspath(A.tree or os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import moba  # noqa: E402
from moba.bench import append_jsonl, card, cuda_graph, source_commit, time_ms  # noqa: E402

K, M = 1024, 1024 * 1024
CASES = {   # name: (lengths before the step, paged)
    "b1_1m": ([M - 1], False),
    "b1_128k": ([128 * K - 1], False),
    "b8_paged": ([262144, 1048575, 524288 + 77, 393216, 786431, 300001, 917504, 655360 + 4095], True),
}
H, HKV, D = 32, 8, 128
DT = torch.bfloat16
DEV = "cuda" if torch.cuda.is_available() else "cpu"
REPEATS = 4             # time_ms: do_bench over 200 ms on CUDA, the median of 4 calls elsewhere
if A.smoke:
    CASES = {"smoke": ([300, 1000, 77], True)}
    A.cases, A.block, A.topk, A.page = "smoke", 64, 3, 16
    H, HKV, D, DT = 4, 2, 16, torch.float32


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def graph_of(fn):
    if DEV != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    return cuda_graph(fn)[0]


def issue_ms(fn, n=100):
    """Host time to issue one eager call (the GPU runs behind; the queue does not fill in n calls)."""
    for _ in range(5):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    ms = (time.perf_counter() - t) / n * 1e3
    sync()
    return ms


def timed(name, fn, row):
    try:
        row[f"{name}_ms"] = time_ms(fn, DEV, REPEATS)
        row[f"{name}_graph_ms"] = time_ms(graph_of(fn), DEV, REPEATS)
    except Exception as e:          # noqa: BLE001 - a dense kernel that does not take this shape is recorded
        row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def selection_bytes(q, sums_per_block, lens_after, bs, topk, elem):
    """(dense bytes, bytes MoBA must read): per sequence and kv head the union of the blocks its query heads chose
    (own block included, each read up to the sequence's length) plus the fp32 key sums of the blocks it scored."""
    dense = moba_b = 0
    G = H // HKV
    for b, L in enumerate(lens_after):
        nb = -(-L // bs)
        own = nb - 1
        row = D * 2 * elem                                              # one key and value row of one kv head
        dense += L * HKV * row
        means = sums_per_block[b][:own].float() / bs                   # [own, Hkv, D]
        for h in range(HKV):
            chosen = {own}
            if own and topk > 1:
                sc = q[b, 0, h * G:(h + 1) * G].float() @ means[:, h].T     # [G, own]
                if A.gate == "group":
                    sc = sc.sum(0, keepdim=True)
                chosen |= set(sc.topk(min(topk - 1, own), dim=1).indices.flatten().tolist())
            toks = sum(min(bs, L - j * bs) for j in chosen)
            moba_b += toks * row + own * D * 4
    return dense, moba_b


def case(name):
    lens, paged = CASES[name]
    B, bs, topk, ps = len(lens), A.block, A.topk, A.page
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(0)
    after = [L + 1 for L in lens]
    cu = [0]
    for L in after:
        cu.append(cu[-1] + L)
    # the keys and values of every sequence, packed: what the dense kernels read in place
    kp = torch.randn(cu[-1], HKV, D, device=dev, dtype=DT, generator=g)
    vp = torch.randn(cu[-1], HKV, D, device=dev, dtype=DT, generator=g)
    q = torch.randn(B, 1, H, D, device=dev, dtype=DT, generator=g)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
    k_new = torch.stack([kp[cu[b + 1] - 1] for b in range(B)])[:, None].contiguous()
    v_new = torch.stack([vp[cu[b + 1] - 1] for b in range(B)])[:, None].contiguous()
    if paged:
        per = [-(-L // ps) for L in after]
        n_pages = sum(per) + 8
        perm = torch.randperm(n_pages, device=dev, generator=g).to(torch.int32)
        kc = torch.empty(n_pages, ps, HKV, D, device=dev, dtype=DT)
        vc = torch.empty_like(kc)
        bt = torch.zeros(B, max(per), dtype=torch.int32, device=dev)
        off = 0
        for b, L in enumerate(after):
            pages = perm[off:off + per[b]]
            off += per[b]
            bt[b, :per[b]] = pages
            pad = per[b] * ps - L
            for src, dst in ((kp, kc), (vp, vc)):
                x = F.pad(src[cu[b]:cu[b + 1]], (0, 0, 0, 0, 0, pad)).view(per[b], ps, HKV, D)
                dst.index_copy_(0, pages.long(), x)
    else:
        Tmax = max(after) + 7
        kc = torch.zeros(B, Tmax, HKV, D, device=dev, dtype=DT)
        vc = torch.zeros_like(kc)
        for b, L in enumerate(after):
            kc[b, :L], vc[b, :L] = kp[cu[b]:cu[b + 1]], vp[cu[b]:cu[b + 1]]
        bt = None
    sums = moba.cache_key_sums(kc, bs, cache_seqlens=seqlens + 1, block_table=bt)
    # the cache before the step holds the sums without the new keys: take them out again (the step adds them)
    if paged:
        pos = seqlens.long()
        sums.index_add_(0, bt.long().gather(1, (pos // ps)[:, None])[:, 0], -k_new[:, 0].float())
    else:
        sums[torch.arange(B, device=dev), seqlens.long() // bs] -= k_new[:, 0].float()

    def step():
        return moba.moba_attention_with_kvcache(q, kc, vc, bs, topk, cache_seqlens=seqlens, block_table=bt,
                                                k_new=k_new, v_new=v_new, key_sums=sums, gate=A.gate)

    row = dict(case=name, tree=A.label, lengths=lens, paged=paged, page_size=ps if paged else None, block=bs,
               topk=topk, gate=A.gate, heads=H, kv_heads=HKV, head_dim=D, dtype=str(DT).removeprefix("torch."), card=card(DEV),
               torch=torch.__version__, commit=source_commit())
    # correctness of the step against dense attention where every block is chosen is the tests' job; here the
    # step's output is checked finite and the selection is measured
    out = step()
    sync()
    row["finite"] = bool(torch.isfinite(out).all())
    # the step against moba_attention of each sequence's query on its keys (the general path): the same function
    ref = torch.cat([moba.moba_attention(q[b:b + 1], kp[cu[b]:cu[b + 1]][None], vp[cu[b]:cu[b + 1]][None], bs, topk,
                                         gate=A.gate) for b in range(B)])
    row["rel_err_vs_moba_attention"] = float((out.float() - ref.float()).norm() / ref.float().norm())
    timed("moba", step, row)
    row["moba_issue_ms"] = issue_ms(step, 100 if DEV == "cuda" else 3)
    if A.profile and DEV == "cuda":
        from moba.bench import profile_call
        row["moba_profile"] = profile_call(step)
    if A.decode_configs:
        from moba.triton import configs
        row["decode_configs"] = []
        for c in A.decode_configs.split(","):
            cfg = tuple(int(x) for x in c.split(":"))
            configs.CONFIG["decode"] = cfg
            try:
                o = step()
                r = dict(config=cfg, rel_diff=float((o.float() - out.float()).norm() / out.float().norm()))
                r["graph_ms"] = time_ms(graph_of(step), DEV, REPEATS)
            except Exception as e:      # noqa: BLE001 - a config the kernel cannot compile is recorded
                r = dict(config=cfg, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            finally:
                configs.CONFIG["decode"] = None
            row["decode_configs"].append(r)
            print(f"   decode config {cfg}: {r.get('graph_ms', r.get('error'))}", flush=True)
    # dense: each sequence's keys in place
    views = [(kp[cu[b]:cu[b + 1]][None], vp[cu[b]:cu[b + 1]][None]) for b in range(B)]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dense_names = {"sdpa": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for dn, be in dense_names.items():
        def dense(be=be):
            outs = []
            for b, (k, v) in enumerate(views):
                args = (q[b:b + 1].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                if be is None:
                    outs.append(F.scaled_dot_product_attention(*args, enable_gqa=True))
                else:
                    with sdpa_kernel([be]):
                        outs.append(F.scaled_dot_product_attention(*args, enable_gqa=True))
            return outs
        timed(dn, dense, row)
    if B > 1:      # FlashAttention-2's varlen kernel over the packed keys, as PyTorch ships it
        cq = torch.arange(B + 1, dtype=torch.int32, device=dev)
        ck = torch.tensor(cu, dtype=torch.int32, device=dev)

        def varlen():
            return torch.ops.aten._flash_attention_forward(q[:, 0], kp, vp, cq, ck, 1, max(after), 0.0, False, False)
        timed("flash_varlen", varlen, row)
    for mode in ("", "_graph"):
        d = {n: row[f"{n}{mode}_ms"] for n in [*dense_names, "flash_varlen"] if f"{n}{mode}_ms" in row}
        if d:
            best = min(d, key=d.get)
            row[f"dense{mode}_best"] = best
            row[f"speedup{mode}"] = d[best] / row[f"moba{mode}_ms"]
    sums_blocks = []
    for b, L in enumerate(after):
        nb = -(-L // bs)
        if paged:
            ppb = bs // ps
            pg = bt[b, :-(-L // ps)].long()
            s = torch.zeros(nb * ppb, HKV, D, device=dev)
            s[:pg.numel()] = sums[pg]
            sums_blocks.append(s.view(nb, ppb, HKV, D).sum(1))
        else:
            sums_blocks.append(sums[b, :nb])
    dense_b, moba_b = selection_bytes(q, sums_blocks, after, bs, topk, kp.element_size())
    row["byte_bound"] = dense_b / moba_b
    for mode in ("", "_graph"):
        if f"speedup{mode}" in row:
            row[f"share_of_bound{mode}"] = row[f"speedup{mode}"] / row["byte_bound"]
    row["moba_graph_gbps"] = moba_b / row.get("moba_graph_ms", math.nan) / 1e6
    return row


def main():
    # SDPA says why each forced kernel declines a shape (cuDNN and flash take no GQA at one query): recorded as errors
    warnings.filterwarnings("ignore", category=UserWarning, module=__name__)
    rows = []
    for name in A.cases.split(","):
        r = case(name)
        rows.append(r)
        gc.collect()            # the case's caches and graphs
        if DEV == "cuda":
            torch.cuda.empty_cache()
        f = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"  # noqa: E731
        print(f"[{A.label}] {name}: moba {f(r.get('moba_ms'))} ms eager (issue {f(r['moba_issue_ms'])}), "
              f"{f(r.get('moba_graph_ms'))} graph; best dense {r.get('dense_best')} "
              f"{f(r.get(str(r.get('dense_best')) + '_ms'))} / graph {r.get('dense_graph_best')} "
              f"{f(r.get(str(r.get('dense_graph_best')) + '_graph_ms'))}; speedup {f(r.get('speedup'))}x eager, "
              f"{f(r.get('speedup_graph'))}x graph; byte bound {r['byte_bound']:.2f}x "
              f"(graph reaches {f(r.get('share_of_bound_graph'))}); finite {r['finite']}, rel. error against "
              f"moba_attention {r['rel_err_vs_moba_attention']:.1e}", flush=True)
        errs = {k: v for k, v in r.items() if k.endswith("_error")}
        if errs:
            print("   ", errs, flush=True)
        if A.out:
            append_jsonl(A.out, [r])


if __name__ == "__main__":
    main()
