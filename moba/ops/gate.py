"""MoBA gate: pool keys per block, score queries against the means of earlier blocks, keep the top ones.

Memory stays bounded: block means are [n_blocks, Hkv, D] fp32 and the scores are computed for chunks of
queries, so no tokens x blocks x heads tensor is ever allocated whole.
"""
from __future__ import annotations

import contextlib

import torch

from .utils import Layout, LayoutTensors

# Elements of one chunk's score tile (fp32): 32M * 4 B = 128 MB at most.
SCORE_TILE = 1 << 25
POOL_TILE = 1 << 25


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

    Deterministic: blocks are gathered into padded tiles and summed, no atomics.
    """
    Tk, Hkv, D = k.shape
    bs = lay.block_size
    NB = lay.n_blocks
    acc = _acc_dtype(k.dtype)
    out = torch.empty(NB, Hkv, D, dtype=acc, device=k.device)
    if NB == 0:
        return out
    step = max(1, POOL_TILE // (bs * Hkv * D))
    ar = torch.arange(bs, device=k.device)
    for b0 in range(0, NB, step):
        b1 = min(NB, b0 + step)
        rows = lt.blk_start[b0:b1, None] + ar                                   # [nb, bs]
        valid = rows < lt.blk_end[b0:b1, None]
        tile = k[rows.clamp(max=Tk - 1)].to(acc) * valid[..., None, None]       # [nb, bs, Hkv, D]
        cnt = (lt.blk_end[b0:b1] - lt.blk_start[b0:b1]).to(acc)
        out[b0:b1] = tile.sum(1) / cnt[:, None, None]
    return out


def select_past_blocks(q: torch.Tensor, k: torch.Tensor, lay: Layout, lt: LayoutTensors, topk: int,
                       means: torch.Tensor | None = None) -> torch.Tensor:
    """Chosen earlier blocks per (query, head).

    q [total_q, Hq, D], k [total_k, Hkv, D] packed. Returns int32 [total_q, Hq, topk - 1] of *global*
    block ids by decreasing gate score, -1 in unused slots (fewer earlier blocks than topk - 1).
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
                score = torch.einsum("tgjd,bgd->tgjb", qc, mc).reshape(t1 - t0, Hq, b_hi - b_lo)
            blk = torch.arange(b_lo, b_hi, device=q.device)
            ok = (blk[None, :] >= lt.first_block[t0:t1, None]) & (blk[None, :] < lt.own_block[t0:t1, None])
            score.masked_fill_(~ok[:, None, :], float("-inf"))
            val, idx = score.topk(n, dim=-1, sorted=True)
            idx = torch.where(torch.isfinite(val), idx + b_lo, torch.full_like(idx, -1))
            sel[t0:t1, :, :n] = idx.to(torch.int32)
        t0 = t1
    return sel


def to_local(sel: torch.Tensor, lay: Layout, lt: LayoutTensors) -> torch.Tensor:
    """[total_q, Hq, topk-1] global ids -> [total_q, Hq, topk] local ids with the own block in slot 0."""
    first = lt.first_block[:, None, None]
    own = (lt.own_block[:, None, None] - first).expand(sel.shape[0], sel.shape[1], 1)
    loc = torch.where(sel >= 0, sel - first, torch.full_like(sel, -1, dtype=torch.int64))
    return torch.cat([own, loc], dim=-1).to(torch.int32)


class BlockMeansCache:
    """Mean keys of the complete blocks of one growing KV cache, updated incrementally.

    The gate only ever scores *complete* blocks (a query's earlier blocks), so when a cache grows by a
    few tokens at most one new block completes: ``means`` pools just the blocks completed since the
    last call instead of re-reading the whole cache. Contract: the keys passed are the same sequence,
    grown by appending (a shorter or differently shaped key tensor resets the cache); call ``reset``
    when a new sequence starts.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self._means = None    # [capacity, Hkv, D] fp32 (fp64 for fp64 keys), rows < n_keys // block
        self.n_keys = 0
        self._key = None

    def means(self, k: torch.Tensor, block_size: int) -> torch.Tensor:
        """k [Tk, Hkv, D] -> [ceil(Tk / block), Hkv, D]; the last, partial block's row is zero (unused)."""
        Tk, Hkv, D = k.shape
        key = (block_size, Hkv, D, k.dtype, k.device)
        if self._key != key or Tk < self.n_keys:
            self.reset()
            self._key = key
        acc = _acc_dtype(k.dtype)
        done, full = self.n_keys // block_size, Tk // block_size
        nb = -(-Tk // block_size)
        if self._means is None or self._means.shape[0] < nb:   # rows past the complete blocks stay zero
            cap = max(nb, 2 * (0 if self._means is None else self._means.shape[0]), 16)
            grown = torch.zeros(cap, Hkv, D, dtype=acc, device=k.device)
            if self._means is not None:
                grown[:done] = self._means[:done]
            self._means = grown
        if full > done:
            new = k[done * block_size:full * block_size].reshape(full - done, block_size, Hkv, D)
            self._means[done:full] = new.sum(1, dtype=acc) / block_size
        self.n_keys = Tk
        return self._means[:nb]
