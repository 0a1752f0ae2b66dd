"""MoBA gate: pool keys per block, score queries against the means of earlier blocks, keep the top ones.

Memory stays bounded: block means are [n_blocks, Hkv, D] fp32 and the scores are computed for chunks of
queries, so no tokens x blocks x heads tensor is ever allocated whole.
"""
from __future__ import annotations

import contextlib

import torch

from ..layout import Layout, LayoutTensors

# Elements of one chunk's score tile (fp32): 4M * 4 B = 16 MB at most, with the chunk's fp32 queries (a larger tile
# was slower on the CPU).
SCORE_TILE = 1 << 22
POOL_TILE = 1 << 25
SLICE_SEQS = 64       # block_means sums per-sequence views up to this many sequences, else gathers


@contextlib.contextmanager
def _exact_fp32():
    """Keep fp32 matmuls in fp32 (no TF32) so the block ranking matches the fp32 reference."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_means(k: torch.Tensor, lay: Layout, lt: LayoutTensors) -> torch.Tensor:
    """Mean key of every block. k [total_k, Hkv, D] packed -> [n_blocks, Hkv, D] in fp32 (fp64 for fp64).

    Deterministic, no atomics. A few sequences: each one's complete blocks are summed as a strided view
    of k (one read, no gathered copy) and its partial last block separately; many sequences: blocks are
    gathered into padded tiles. Both in passes of at most POOL_TILE elements.
    """
    Tk, Hkv, D = k.shape
    bs = lay.block_size
    NB = lay.n_blocks
    acc = _acc_dtype(k.dtype)
    out = torch.empty(NB, Hkv, D, dtype=acc, device=k.device)
    if NB == 0:
        return out
    step = max(1, POOL_TILE // (bs * Hkv * D))
    if lay.n_seqs <= SLICE_SEQS:
        for i in range(lay.n_seqs):
            k0, k1, b0 = lay.cu_k[i], lay.cu_k[i + 1], lay.blk_off[i]
            full = (k1 - k0) // bs
            for c in range(0, full, step):
                n = min(step, full - c)
                tile = k[k0 + c * bs:k0 + (c + n) * bs].unflatten(0, (n, bs))           # a view, any strides
                torch.sum(tile, 1, dtype=acc, out=out[b0 + c:b0 + c + n]).div_(bs)
            if k0 + full * bs < k1:                                              # the partial last block
                torch.mean(k[k0 + full * bs:k1], 0, dtype=acc, out=out[b0 + full])
        return out
    ar = torch.arange(bs, device=k.device)
    for b0 in range(0, NB, step):
        b1 = min(NB, b0 + step)
        rows = lt.blk_start[b0:b1, None] + ar                                   # [nb, bs]
        valid = rows < lt.blk_end[b0:b1, None]
        tile = k[rows.clamp(max=Tk - 1)].to(acc) * valid[..., None, None]       # [nb, bs, Hkv, D]
        cnt = (lt.blk_end[b0:b1] - lt.blk_start[b0:b1]).to(acc)
        out[b0:b1] = tile.sum(1) / cnt[:, None, None]
    return out


TOP_BY_MAX = 4   # up to this many chosen blocks, repeated max is faster than torch.topk on the CPU
TOP_MIN_SIZE = 1 << 16   # on scores this large or larger (a decode step's few are faster through one topk call)


def _top(score: torch.Tensor, n: int):
    """``score.topk(n, dim=-1, sorted=True)``; for small ``n`` on large scores by repeated max, each winner then
    masked out of ``score`` (which is overwritten: the caller's temporary)."""
    if n > TOP_BY_MAX or score.numel() < TOP_MIN_SIZE:
        return score.topk(n, dim=-1, sorted=True)
    vals, idxs = [], []
    for j in range(n):
        v, i = score.max(-1, keepdim=True)
        vals.append(v)
        idxs.append(i)
        if j + 1 < n:
            score.scatter_(-1, i, float("-inf"))
    return torch.cat(vals, -1), torch.cat(idxs, -1)


def select_past_blocks(q: torch.Tensor, k: torch.Tensor, lay: Layout, lt: LayoutTensors, topk: int,
                       means: torch.Tensor | None = None, group: bool = False) -> torch.Tensor:
    """Chosen earlier blocks per (query, head).

    q [total_q, Hq, D], k [total_k, Hkv, D] packed. Returns int32 [total_q, Hq, topk - 1] of *global*
    block ids by decreasing gate score, -1 in unused slots (fewer earlier blocks than topk - 1). ``group``
    (``gate="group"``): the scores of a kv head's G query heads summed, one choice for all G.
    """
    Tq, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    S = topk - 1
    sel = torch.full((Tq, Hq, max(S, 0)), -1, dtype=torch.int32, device=q.device)
    if S == 0 or Tq == 0 or lay.n_blocks < 2:
        return sel
    if means is None:
        means = block_means(k, lay, lt)
    acc = means.dtype
    # one chunk of queries scores the blocks spanned by its sequences only
    chunk = max(1, SCORE_TILE // (Hq * max(1, lay.n_blocks)))
    t0 = 0
    while t0 < Tq:
        t1 = min(Tq, t0 + chunk)
        b_lo = int(lt.first_block[t0])
        b_hi = int(lt.own_block[t1 - 1])
        n = min(S, b_hi - b_lo)
        if n > 0:
            qc = q[t0:t1].to(acc).view(t1 - t0, Hkv, G, D)
            mc = means[b_lo:b_hi]                                               # [nbr, Hkv, D]
            with _exact_fp32():
                score = torch.einsum("tgjd,bgd->tgjb", qc, mc)
            score = score.sum(2) if group else score.reshape(t1 - t0, Hq, b_hi - b_lo)   # [t, Hkv or Hq, nbr]
            blk = torch.arange(b_lo, b_hi, device=q.device)
            ok = (blk[None, :] >= lt.first_block[t0:t1, None]) & (blk[None, :] < lt.own_block[t0:t1, None])
            score.masked_fill_(~ok[:, None, :], float("-inf"))
            val, idx = _top(score, n)
            idx = torch.where(torch.isfinite(val), idx + b_lo, torch.full_like(idx, -1)).to(torch.int32)
            if group:
                idx = idx[:, :, None, :].expand(t1 - t0, Hkv, G, n).reshape(t1 - t0, Hq, n)
            sel[t0:t1, :, :n] = idx
        t0 = t1
    return sel


def to_local(sel: torch.Tensor, lay: Layout, lt: LayoutTensors) -> torch.Tensor:
    """[total_q, Hq, topk-1] global ids -> [total_q, Hq, topk] local ids with the own block in slot 0."""
    first = lt.first_block[:, None, None]
    own = (lt.own_block[:, None, None] - first).expand(sel.shape[0], sel.shape[1], 1)
    loc = torch.where(sel >= 0, sel - first, torch.full_like(sel, -1, dtype=torch.int64))
    return torch.cat([own, loc], dim=-1).to(torch.int32)
