"""Triton decode kernels: one query per sequence against its KV cache (inference only, no backward).

A step is three launches (four with a KV cache's append, `append`), sized by `configs.DECODE_DEFAULT`:

- `_decode_gate`, grid (query, kv head): loads the query rows of the kv head's G query heads, ranks the earlier
  blocks by <q, block mean> (running top-(topk-1), as ``moba.triton.gate._gate_topk``) and writes each row's
  choices and the list of their union with the own block (`_list_union`). Optionally several programs per
  (query, kv head) score the blocks side by side and `_decode_gate_merge` ranks their candidates.
- `_decode_split`, grid (query, kv head, split): the splits take the list's work items (up to 512 keys of one
  block) in turn and read each item's K/V once for every head of the group that chose its block (the union is
  read once per kv head, not once per query head), keeping a running (max, sum, output) per head.
- `_decode_merge`, grid (query, query head): combines the splits' partial results.

With the listed field of the config 0 there is no gate launch: every split runs the gate itself and takes every
NSPLIT-th work item of all the blocks (slower wherever measured: docs/performance.md); with topk covering every
block (``all_blocks``) nothing is ranked and every block is read.

A sequence's keys are rows K_START .. K_END - 1 of batch row ROW, so the same kernel reads packed
sequences (``decode``: one row, cu_seqlens_k offsets) and the rows of a padded cache in place
(``decode_padded``: what ``moba.hf`` uses for a padded batch's generation steps; no packing copy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import Layout, LayoutTensors
from ..utils import cached, cdiv, new_empty, next_pow2, sm_count, to_device
from . import configs
from .common import online_softmax
from .gate import _topk_replace, scores_of, topk_merge
from .launch import launch_kernel


@triton.jit
def _seq_of(i_n, K_START, K_END, ROW, BLK_OFF, TQ, NBR, FROM_LENS: tl.constexpr):
    """Query row i_n's keys (rows k0 .. k1 - 1 of batch row ``row``) and its sequence's first block-means row."""
    if FROM_LENS:   # a KV cache's step: query i_n is the (i_n % TQ)-th new one of sequence i_n // TQ
        row = (i_n // TQ).to(tl.int64)
        k0 = 0
        k1 = tl.load(K_END + row).to(tl.int32) + i_n % TQ + 1
        fb = row * NBR
    else:
        k0 = tl.load(K_START + i_n).to(tl.int32)
        k1 = tl.load(K_END + i_n).to(tl.int32)
        row = tl.load(ROW + i_n).to(tl.int64)
        fb = tl.load(BLK_OFF + i_n)
    return k0, k1, row, fb


@triton.jit
def _gate_of(b_q, M, BT, fb, own, i_g, sm_b, sm_h, m_scale, PPB, m_r, c_first, c_step, G: tl.constexpr,
             GP: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
             BNB: tl.constexpr, SPLIT_M: tl.constexpr, PREC: tl.constexpr, PAGED: tl.constexpr, GROUP: tl.constexpr,
             REPLACE: tl.constexpr):
    """The S best earlier blocks of each of the G query rows [GP, BD] among the chunks of BNB blocks that start at
    c_first, c_first + c_step, ...: their scores and local ids [GP, SP] (-inf and -1 for none), in no particular
    order. GROUP (the ``gate="group"`` variant): by the sum of the G rows' scores, the same blocks for every row.
    REPLACE: kept by `_topk_replace` (the same set)."""
    BIG: tl.constexpr = 2147483647
    o_d = tl.arange(0, BD)
    b_bv = tl.full([GP, SP], float("-inf"), tl.float32)
    b_bi = tl.full([GP, SP], BIG, tl.int32)
    if S > 0:
        n_gate = own
    else:           # topk 1: the own block alone, nothing to score
        n_gate = own * 0
    for c0 in range(c_first, n_gate, c_step):
        o_b = c0 + tl.arange(0, BNB)
        m_b = o_b < own
        m_ld = m_b[None, :] & (o_d[:, None] < D)
        if PAGED:     # a block's sum: its PPB pages' sums
            b_mn = tl.zeros([BD, BNB], tl.float32)
            for j in range(PPB):
                pg = tl.load(BT + o_b * PPB + j, mask=m_b, other=0).to(tl.int64)
                b_mn += tl.load(M + pg[None, :] * sm_b + i_g * sm_h + o_d[:, None], mask=m_ld, other=0.)
        else:
            b_mn = tl.load(M + (fb + o_b)[None, :] * sm_b + i_g * sm_h + o_d[:, None], mask=m_ld, other=0.)
        b_sc = scores_of(b_q, b_mn * m_scale, SPLIT_M, PREC)
        if GROUP:
            b_sc = tl.broadcast_to(tl.sum(tl.where(m_r[:, None], b_sc, 0.), 0)[None, :], [GP, BNB])
        b_sc = tl.where(m_r[:, None] & m_b[None, :], b_sc, float("-inf"))
        if REPLACE:
            b_bv, b_bi = _topk_replace(b_bv, b_bi, b_sc, o_b, S, SP)
        else:
            b_bv, b_bi = topk_merge(b_bv, b_bi, b_sc, o_b, S, SP, GP)
    return b_bv, tl.where(b_bv > float("-inf"), b_bi, -1)


@triton.jit
def _decode_gate(Q, M, K_START, K_END, ROW, BLK_OFF, BI, LIST, CNT, CV, sq_n, sq_h, sm_b, sm_h, block_size, m_scale,
                 BT, sbt, PPB, TQ, NBR,
                 G: tl.constexpr, GP: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, D: tl.constexpr,
                 BD: tl.constexpr, BNB: tl.constexpr, SPLIT_M: tl.constexpr, PREC: tl.constexpr,
                 PAGED: tl.constexpr = False, FROM_LENS: tl.constexpr = False, GROUP: tl.constexpr = False,
                 REPLACE: tl.constexpr = False, NPROG: tl.constexpr = 1, GR: tl.constexpr = 16):
    """The gate of one query (program axis 0) and kv head (axis 1), once for all the splits that read its blocks:
    each query row's chosen blocks (BI [GP, SP], -1 for none) and their union with the own block as a list (LIST:
    the distinct chosen blocks in increasing order, then the own block; CNT: its length), from which the splits take
    work items in turn. NPROG > 1: program c (axis 2) of NPROG scores the chunks c, c + NPROG, ... of the blocks
    and writes its best S per row, scores in CV and ids in BI ([.., NPROG, GP, SP]); `_decode_gate_merge` ranks
    them and writes the list (a long sequence's blocks are scored by NPROG programs side by side)."""
    i_n = tl.program_id(0)
    i_g = tl.program_id(1)
    i_c = tl.program_id(2)
    k0, k1, row, fb = _seq_of(i_n, K_START, K_END, ROW, BLK_OFF, TQ, NBR, FROM_LENS)
    if PAGED:
        BT += row * sbt
    own = (k1 - k0 - 1) // block_size
    o_r = tl.arange(0, GP)
    m_r = o_r < G
    o_d = tl.arange(0, BD)
    b_q = tl.load(Q + i_n * sq_n + (i_g * G + o_r)[:, None] * sq_h + o_d[None, :],
                  mask=m_r[:, None] & (o_d[None, :] < D), other=0.)      # [GP, BD]
    b_bv, b_bi = _gate_of(b_q, M, BT, fb, own, i_g, sm_b, sm_h, m_scale, PPB, m_r, i_c * BNB, NPROG * BNB, G, GP,
                          S, SP, D, BD, BNB, SPLIT_M, PREC, PAGED, GROUP, REPLACE)
    base = (i_n * tl.num_programs(1) + i_g).to(tl.int64)
    o_s = tl.arange(0, SP)
    tile = ((base * NPROG + i_c) * GP + o_r)[:, None] * SP + o_s[None, :]
    tl.store(BI + tile, b_bi)
    if NPROG > 1:
        tl.store(CV + tile, b_bv)
    else:
        _list_union(BI, LIST, CNT, base, own, GP, SP, GR)


@triton.jit
def _decode_gate_merge(BI, LIST, CNT, CV, K_START, K_END, ROW, BLK_OFF, block_size, TQ, NBR, BIC,
                       GP: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, NPROG: tl.constexpr,
                       GR: tl.constexpr, FROM_LENS: tl.constexpr = False):
    """`_decode_gate`'s NPROG programs of one query and kv head merged: the S best of their NPROG x S candidates
    per row (S rounds of max extraction, ties to the lower id; a block was scored by one program only), stored in
    BIC [GP, SP] as `_decode_gate` with one program stores them, and their union's list."""
    i_n = tl.program_id(0)
    i_g = tl.program_id(1)
    k0, k1, row, fb = _seq_of(i_n, K_START, K_END, ROW, BLK_OFF, TQ, NBR, FROM_LENS)
    own = (k1 - k0 - 1) // block_size
    base = (i_n * tl.num_programs(1) + i_g).to(tl.int64)
    BIG: tl.constexpr = 2147483647
    W: tl.constexpr = NPROG * SP
    o_r = tl.arange(0, GP)
    o_w = tl.arange(0, W)
    o_s = tl.arange(0, SP)
    off = ((base * NPROG + o_w[None, :] // SP) * GP + o_r[:, None]) * SP + o_w[None, :] % SP       # [GP, W]
    ids = tl.load(BI + off)
    vals = tl.where(ids >= 0, tl.load(CV + off), float("-inf"))
    b_ni = tl.full([GP, SP], -1, tl.int32)
    for r in range(S):
        mx = tl.max(vals, 1)
        idx = tl.min(tl.where(vals == mx[:, None], ids, BIG), 1)
        b_ni = tl.where((o_s[None, :] == r) & (mx > float("-inf"))[:, None], idx[:, None], b_ni)
        vals = tl.where(ids == idx[:, None], float("-inf"), vals)
    tl.store(BIC + (base * GP + o_r)[:, None] * SP + o_s[None, :], b_ni)
    _list_union(BIC, LIST, CNT, base, own, GP, SP, GR)


@triton.jit
def _list_union(BI, LIST, CNT, base, own, GP: tl.constexpr, SP: tl.constexpr, GR: tl.constexpr):
    """The list of the distinct blocks chosen by the first GR rows of BI's [GP, SP] tile at ``base`` (the rows of
    real heads; the rest choose nothing), in increasing order, then the own block (LIST; its length in CNT).

    The choices are read back from BI as one flat row (a barrier makes the program's stores visible to all its
    threads) and compared with chunks of themselves: an id is kept where it first appears, and placed after the
    distinct ids below it. No reshape, sort or gather of a tile in the gate's layout (the form whose fp32 build gave
    wrong lists on a GPU, docs/performance.md), and no [L, L] tile (which spills at 16 x 16 choices)."""
    L: tl.constexpr = GR * SP
    JC: tl.constexpr = 16 if L > 16 else L
    LB = LIST + base * (GP * SP + 1)
    tl.debug_barrier()
    o_l = tl.arange(0, L)
    o_j = tl.arange(0, JC)
    v = tl.load(BI + base * GP * SP + o_l)
    dup = tl.zeros([L], tl.int32)
    for j0 in tl.static_range(0, L, JC):        # an id is a repeat if an earlier entry holds it
        vj = tl.load(BI + base * GP * SP + j0 + o_j)
        hit = ((j0 + o_j)[None, :] < o_l[:, None]) & (vj[None, :] == v[:, None])
        dup += tl.sum(hit.to(tl.int32), 1)
    first = (v >= 0) & (dup == 0)
    tl.store(LB + o_l, tl.where(first, v, -1))  # the first appearances, read back in chunks (LIST is scratch here)
    tl.debug_barrier()
    pos = tl.zeros([L], tl.int32)
    for j0 in tl.static_range(0, L, JC):        # distinct ids below v_i
        wj = tl.load(LB + j0 + o_j)
        pos += tl.sum(((wj[None, :] >= 0) & (wj[None, :] < v[:, None])).to(tl.int32), 1)
    n = tl.sum(first.to(tl.int32), 0)
    tl.debug_barrier()                          # every chunk read before the list overwrites them
    tl.store(LB + pos, v, mask=first)
    tl.store(LB + n, own)
    tl.store(CNT + base, n + 1)


@triton.jit
def _decode_split(Q, K, V, M, K_START, K_END, ROW, BLK_OFF, PM, PL, PACC, BI, LIST, CNT,
                  sq_n, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sm_b, sm_h, scale_log2, block_size, m_scale,
                  BT, sbt, PS, PPB, TQ, NBR,
                  G: tl.constexpr, GP: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, NSPLIT: tl.constexpr,
                  D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                  BNB: tl.constexpr, CH: tl.constexpr, SPLIT_M: tl.constexpr, PREC: tl.constexpr,
                  PAGED: tl.constexpr = False, FROM_LENS: tl.constexpr = False, LISTED: tl.constexpr = False,
                  ALL: tl.constexpr = False, GROUP: tl.constexpr = False, REPLACE: tl.constexpr = False):
    """One query (program axis 0), one kv head, one split of the walk over the blocks. Keys: rows k0 .. k1 - 1 of
    batch row ROW; or (PAGED) positions k0 .. k1 - 1 of sequence ROW's pages BT[ROW, :] (PS rows each, page stride
    sk_b), its block means the sums of its blocks' PPB pages in M ([pages, Hkv, D]). Means are M's rows times
    ``m_scale`` (1 for means, 1 / block_size for sums). FROM_LENS (a KV cache's step): the tables are not built on
    the host; K_END is the cache's lengths before the TQ new queries of each sequence, query i_n is the
    (i_n % TQ)-th new one of sequence i_n // TQ, whose block means start at row (i_n // TQ) * NBR of M.
    LISTED: the gate ran before (`_decode_gate`: BI, LIST, CNT) and the splits take the work items of the listed
    blocks in turn (every split gets the same share of the reading); else each program runs the gate itself and
    takes every NSPLIT-th work item of all the blocks, reading those some head chose. ALL: topk covers every block
    (dense causal attention; S is 0, no gate runs) and every block is read for every head."""
    i_n = tl.program_id(0)
    i_g = tl.program_id(1)
    i_s = tl.program_id(2)
    k0, k1, row, fb = _seq_of(i_n, K_START, K_END, ROW, BLK_OFF, TQ, NBR, FROM_LENS)
    if PAGED:
        BT += row * sbt
    else:
        K += row * sk_b
        V += row * sv_b
    own = (k1 - k0 - 1) // block_size                                  # local id of the own block
    o_r = tl.arange(0, GP)
    m_r = o_r < G
    o_d = tl.arange(0, BD)
    o_dv = tl.arange(0, BDV)
    b_q = tl.load(Q + i_n * sq_n + (i_g * G + o_r)[:, None] * sq_h + o_d[None, :],
                  mask=m_r[:, None] & (o_d[None, :] < D), other=0.)      # [GP, BD]
    base = (i_n * tl.num_programs(1) + i_g).to(tl.int64)
    if LISTED:
        o_s = tl.arange(0, SP)
        b_bi = tl.load(BI + (base * GP + o_r)[:, None] * SP + o_s[None, :])     # [GP, SP] chosen local block ids
        n_blk = tl.load(CNT + base)
    else:
        b_bi = _gate_of(b_q, M, BT, fb, own, i_g, sm_b, sm_h, m_scale, PPB, m_r, 0, BNB, G, GP, S, SP, D, BD, BNB,
                        SPLIT_M, PREC, PAGED, GROUP, REPLACE)[1]
        n_blk = own + 1
    # attention over this split's share of the union of chosen blocks, plus the own block
    b_m = tl.full([GP], float("-inf"), tl.float32)
    b_l = tl.zeros([GP], tl.float32)
    b_acc = tl.zeros([GP, BDV], tl.float32)
    cpb = tl.cdiv(block_size, CH)                                       # work items (chunks) per block
    for w in range(i_s, n_blk * cpb, NSPLIT):
        if LISTED:
            b = tl.load(LIST + base * (GP * SP + 1) + w // cpb)
        else:
            b = w // cpb
        rows = (tl.max(tl.where(b_bi == b, 1, 0), 1) > 0) | (b == own) | ALL   # [GP] heads that read block b
        rows = rows & m_r
        if tl.max(rows.to(tl.int32), 0) > 0:
            kb0 = k0 + b * block_size + (w % cpb) * CH
            kb1 = tl.minimum(tl.minimum(kb0 + CH, k0 + (b + 1) * block_size), k1)
            for n0 in range(kb0, kb1, BN):
                o_n = n0 + tl.arange(0, BN)
                m_n = o_n < kb1
                o_n = o_n.to(tl.int64)                                        # offsets past 2^31 elements
                if PAGED:     # position -> (page, row in the page)
                    pg = tl.load(BT + o_n // PS, mask=m_n, other=0).to(tl.int64)
                    r_k = pg * sk_b + (o_n % PS) * sk_t
                    r_v = pg * sv_b + (o_n % PS) * sv_t
                else:
                    r_k = o_n * sk_t
                    r_v = o_n * sv_t
                b_k = tl.load(K + r_k[None, :] + i_g * sk_h + o_d[:, None],
                              mask=m_n[None, :] & (o_d[:, None] < D), other=0.)   # [BD, BN]
                b_s = tl.dot(b_q, b_k, input_precision=PREC) * scale_log2             # [GP, BN]
                b_s = tl.where(rows[:, None] & m_n[None, :], b_s, float("-inf"))
                b_m, b_l, b_acc = online_softmax(b_s, V + r_v[:, None] + i_g * sv_h + o_dv[None, :],
                                                  m_n[:, None] & (o_dv[None, :] < DV), b_m, b_l, b_acc, PREC,
                                                  True)
    base = base * NSPLIT + i_s
    tl.store(PM + base * GP + o_r, b_m)
    tl.store(PL + base * GP + o_r, b_l)
    tl.store(PACC + (base * GP + o_r)[:, None] * BDV + o_dv[None, :], b_acc)


@triton.jit
def _decode_merge(PM, PL, PACC, O, LSE, so_n, so_h, Hq, G: tl.constexpr, GP: tl.constexpr,
                  NSPLIT: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    i_g = i_h // G
    r = i_h % G
    o_sp = tl.arange(0, NSPLIT)
    o_dv = tl.arange(0, BDV)
    base = ((i_n * (Hq // G) + i_g) * NSPLIT + o_sp) * GP + r            # [NSPLIT]
    b_m = tl.load(PM + base)
    b_l = tl.load(PL + base)
    b_acc = tl.load(PACC + base[:, None] * BDV + o_dv[None, :])         # [NSPLIT, BDV]
    m = tl.max(b_m, 0)
    w = tl.where(b_m == float("-inf"), 0., tl.exp2(b_m - m))
    l_tot = tl.sum(b_l * w, 0)
    o = tl.sum(b_acc * w[:, None], 0) / l_tot
    tl.store(O + i_n * so_n + i_h * so_h + o_dv, o.to(O.dtype.element_ty), mask=o_dv < DV)
    tl.store(LSE + i_n * Hq + i_h, (m + tl.log2(l_tot)) * 0.6931471805599453)


def usable(q: torch.Tensor, lay: Layout, topk: int, keep_sel: bool) -> bool:
    """The decode kernel serves inference calls where every sequence has exactly one query."""
    return (not keep_sel and topk > 1 and lay.n_seqs > 0 and lay.n_blocks > 1
            and all(lay.cu_q[i + 1] - lay.cu_q[i] == 1 for i in range(lay.n_seqs)))


def decode(q, k, v, lay: Layout, lt: LayoutTensors, topk: int, scale: float, means: torch.Tensor,
           group: bool = False):
    """q [N, Hq, D] (one query per sequence), k/v packed [Tk, Hkv, D] -> out [N, Hq, Dv], lse fp32 [N, Hq].
    ``group``: the ``gate="group"`` variant."""
    cu = lt.cu_k
    rows = cached(("decode_rows", lay.n_seqs, str(q.device)), lambda: torch.zeros_like(cu[:-1]))   # all in row 0
    return _launch(q, k[None], v[None], cu[:-1], cu[1:], rows, lt.blk_off, lay.block_size, topk, scale, means,
                   group=group)


def decode_padded(q, k, v, starts, ends, block_size: int, topk: int, scale: float, means: torch.Tensor,
                  group: bool = False):
    """One query per batch row against the row's keys ``k[b, starts[b]:ends[b]]`` of a padded cache, read in
    place (no packing copy): q [B, Hq, D], k/v [B, L, Hkv, D] (any strides) -> out [B, Hq, Dv], lse [B, Hq].

    ``means`` holds the rows' block means one after another, ``ceil(len / block)`` rows per batch row, as
    ``BlockMeansCache.means(k, block_size, starts=..., ends=...)`` returns them. Every row needs a key.
    """
    B = q.shape[0]
    if len(starts) != B or len(ends) != B or any(e <= s for s, e in zip(starts, ends)):
        raise ValueError(f"decode_padded needs one non-empty key range per batch row; got {list(zip(starts, ends))}")
    off = [0]
    for s, e in zip(starts, ends):
        off.append(off[-1] + -(-(e - s) // block_size))
    t = to_device(torch.tensor([list(starts), list(ends), list(range(B)), off[:-1]], dtype=torch.int32), q.device)
    return _launch(q, k, v, t[0], t[1], t[2], t[3], block_size, topk, scale, means, group=group)


def _launch(q, k, v, k_start, k_end, row, blk_off, block_size, topk, scale, means, m_scale=1.0, paged=None,
            from_lens=None, all_blocks=False, group=False):
    """q [N, Hq, D], one query per program row; ``paged``: (block_table, page_size) with k/v [pages, page_size,
    Hkv, D] and ``means`` the per-page key sums; ``from_lens``: (Tq, blocks per batch row of ``means``) where
    ``k_end`` is a KV cache's lengths and the kernel derives the rest (FROM_LENS); ``group``: the ``gate="group"``
    variant."""
    N, Hq, D = q.shape
    Hkv, DV = k.shape[2], v.shape[3]
    G = Hq // Hkv
    GP = max(16, next_pow2(G))
    S = 0 if all_blocks else topk - 1          # all_blocks: topk covers every block, nothing to choose
    BD, BDV = max(16, next_pow2(D)), max(16, next_pow2(DV))
    # enough programs to keep every SM streaming K/V (per_sm over the whole grid), each (sequence, kv head)'s walk
    # in at most max_splits; a work item is `chunk` keys, so a chosen block is read by several programs at once
    cfg = tuple(configs.CONFIG["decode"] or ())
    per_sm, max_splits, bn, warps, stages, chunk, listed, bnb, replace, gate_progs = \
        cfg + configs.DECODE_DEFAULT[len(cfg):]
    sms = sm_count(q.device) if q.is_cuda else 1
    NSPLIT = min(max_splits, max(2, next_pow2(cdiv(per_sm * sms, N * Hkv))))
    n_part = N * Hkv * NSPLIT * GP                      # per split: running max, sum and output of each row
    part = torch.empty(n_part * (BDV + 2), dtype=torch.float32, device=q.device)
    pm, pl, pacc = part[:n_part], part[n_part:2 * n_part], part[2 * n_part:].view(n_part, BDV)
    out = new_empty(N, Hq, DV, dtype=q.dtype, device=q.device)
    lse = new_empty(N, Hq, dtype=torch.float32, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    bt, ps = paged if paged is not None else (row, 1)
    listed = bool(listed) and S > 0
    SP = max(1, next_pow2(S))
    lens = from_lens or (1, 0)
    kw = dict(G=G, GP=GP, S=S, SP=SP, D=D, BD=BD, BNB=bnb, SPLIT_M=q.dtype != torch.float32, PREC=prec,
              PAGED=paged is not None, FROM_LENS=from_lens is not None, GROUP=group and G > 1,
              REPLACE=bool(replace))
    if listed:      # the gate once per (query, kv head): its choices and their union's list
        bi, lst, cnt = _gate_lists(q, means, k_start, k_end, row, blk_off, block_size, m_scale, bt, ps, lens, kw,
                                   max(1, next_pow2(gate_progs)))
    else:
        bi = lst = cnt = part                                           # unread
    launch_kernel(_decode_split, (N, Hkv, NSPLIT), q, k, v, means, k_start, k_end, row, blk_off, pm, pl, pacc, bi, lst,
                  cnt, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
                  v.stride(2), means.stride(0), means.stride(1), scale * 1.4426950408889634, block_size, m_scale, bt,
                  bt.stride(0), ps, block_size // ps, *lens, NSPLIT=NSPLIT, DV=DV, BDV=BDV, BN=bn, CH=chunk,
                  LISTED=listed, ALL=all_blocks, **kw, num_warps=warps, num_stages=stages)
    launch_kernel(_decode_merge, (N, Hq), pm, pl, pacc, out, lse, out.stride(0), out.stride(1), Hq, G=G, GP=GP,
                  NSPLIT=NSPLIT, DV=DV, BDV=BDV)
    return out, lse


def _gate_lists(q, means, k_start, k_end, row, blk_off, block_size, m_scale, bt, ps, lens, kw, nprog=1):
    """`_decode_gate` over every (query, kv head), in ``nprog`` programs each (then `_decode_gate_merge`): each
    query row's chosen blocks BI [N, Hkv, GP, SP] (-1 for none), the list of their union then the own block
    [N, Hkv, GP * SP + 1], and the list's length [N, Hkv]."""
    N, Hkv, GP, SP = q.shape[0], q.shape[1] // kw["G"], kw["GP"], kw["SP"]
    # the rows of real heads that the union reads; under gate="group" they all hold the same choices: the first
    GR = 1 if kw["GROUP"] else next_pow2(kw["G"])
    bi = torch.empty(N, Hkv, GP, SP, dtype=torch.int32, device=q.device)
    lst = torch.empty(N, Hkv, GP * SP + 1, dtype=torch.int32, device=q.device)
    cnt = torch.empty(N, Hkv, dtype=torch.int32, device=q.device)
    if nprog > 1:       # each program's best S per row: ids and scores
        cand = torch.empty(2, N * Hkv * nprog * GP * SP, dtype=torch.int32, device=q.device)
        ci, cv = cand[0], cand[1].view(torch.float32)
    else:
        ci, cv = bi, bi                                                 # cv unread
    launch_kernel(_decode_gate, (N, Hkv, nprog), q, means, k_start, k_end, row, blk_off, ci, lst, cnt, cv, q.stride(0),
                  q.stride(1), means.stride(0), means.stride(1), block_size, m_scale, bt, bt.stride(0),
                  block_size // ps, *lens, **kw, NPROG=nprog, GR=GR, num_warps=4)
    if nprog > 1:
        launch_kernel(_decode_gate_merge, (N, Hkv), ci, lst, cnt, cv, k_start, k_end, row, blk_off, block_size, *lens,
                      bi, GP=GP, S=kw["S"], SP=SP, NPROG=nprog, GR=GR, FROM_LENS=kw["FROM_LENS"], num_warps=4)
    return bi, lst, cnt


def kvcache(q, k_cache, v_cache, block_size: int, topk: int, cache_seqlens, block_table, key_sums, scale: float,
            group: bool = False):
    """`moba.moba_attention_with_kvcache` after the append: q [B, Tq, Hq, D] (the last Tq positions of each
    sequence) -> out [B, Tq, Hq, Dv], lse [B, Tq, Hq]. Every query is one row of the split kernel, its keys the
    positions up to its own, derived from ``cache_seqlens`` inside the kernel (no host sync, launch shapes fixed
    by the inputs' shapes: CUDA-graph capturable)."""
    from ..kvcache import cache_key_sums
    B, Tq, Hq, D = q.shape
    if key_sums is None:     # the slow path: the sums from the cache (the new keys included), every call
        key_sums = cache_key_sums(k_cache, block_size, cache_seqlens=cache_seqlens + Tq, block_table=block_table)
    if block_table is None:      # the sums of batch row b's blocks are rows b * nb .. of the flattened sums
        nb = key_sums.shape[1]
        sums, paged = key_sums.view(B * nb, *key_sums.shape[2:]), None
    else:
        nb, sums, paged = 0, key_sums, (block_table, k_cache.shape[1])
    # FROM_LENS: the kernel derives each query row's keys and sums rows from cache_seqlens (passed as K_END; the
    # other table arguments are unread), so the host runs no table ops
    lens = cache_seqlens
    # the most blocks a sequence of this cache can have: a topk covering them is dense causal attention (no gate)
    most = -(-(k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]) // block_size)
    out, lse = _launch(q.reshape(B * Tq, Hq, D), k_cache, v_cache, lens, lens, lens, lens, block_size, topk, scale,
                       sums, 1.0 / block_size, paged=paged, from_lens=(Tq, nb), all_blocks=topk >= most, group=group)
    return out.view(B, Tq, Hq, -1), lse.view(B, Tq, Hq)


APPEND_MAX_TQ = 64      # new rows per sequence that the append kernel writes one after another; more: torch ops


@triton.jit
def _append_rows(KN, VN, KC, VC, LENS, BT, SUMS, skn_b, skn_t, skn_h, svn_b, svn_t, svn_h,
                 skc_p, skc_t, skc_h, svc_p, svc_t, svc_h, sbt, ss_r, ss_h, TQ, PS, SROWS,
                 D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PAGED: tl.constexpr,
                 HAS_SUMS: tl.constexpr):
    """Sequence b's TQ new keys and values (program axis 0) of one kv head (axis 1), written at positions
    LENS[b] + i of its cache and added into its key sums, one row after another: a sum row is read, added to and
    written by this program alone (deterministic). Paged: position p lies in page BT[b, p // PS], whose sums are
    row BT[b, p // PS] of SUMS. Contiguous: row p of batch row b, sums row b * SROWS + p // PS (PS is then the
    block size, SROWS the blocks per batch row)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    o_d = tl.arange(0, BD)
    o_dv = tl.arange(0, BDV)
    L = tl.load(LENS + b).to(tl.int64)
    for i in range(TQ):
        pos = L + i
        if PAGED:
            pg = tl.load(BT + b * sbt + pos // PS).to(tl.int64)
            r = pos % PS
            srow = pg
        else:
            pg = b
            r = pos
            srow = b * SROWS + pos // PS
        b_k = tl.load(KN + b * skn_b + i * skn_t + h * skn_h + o_d, mask=o_d < D)
        b_v = tl.load(VN + b * svn_b + i * svn_t + h * svn_h + o_dv, mask=o_dv < DV)
        tl.store(KC + pg * skc_p + r * skc_t + h * skc_h + o_d, b_k, mask=o_d < D)
        tl.store(VC + pg * svc_p + r * svc_t + h * svc_h + o_dv, b_v, mask=o_dv < DV)
        if HAS_SUMS:
            p_s = SUMS + srow * ss_r + h * ss_h + o_d
            tl.store(p_s, tl.load(p_s, mask=o_d < D) + b_k.to(tl.float32), mask=o_d < D)


def append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, key_sums, block_size) -> bool:
    """``moba.kvcache``'s append in one launch (no host sync): False where it does not apply (more than
    APPEND_MAX_TQ new rows per sequence, or key sums not float32 [.., Hkv, D] with a unit last stride), and the
    caller appends with torch ops."""
    B, Tq, Hkv, D = k_new.shape
    DV = v_new.shape[3]
    strides = k_new.stride(), v_new.stride(), k_cache.stride(), v_cache.stride()
    if Tq > APPEND_MAX_TQ or any(st[3] != 1 for st in strides):
        return False
    paged = block_table is not None
    if key_sums is not None:
        sums = key_sums if paged else key_sums.view(-1, *key_sums.shape[2:])
        srows = 0 if paged else key_sums.shape[1]
        if sums.stride(2) != 1:
            return False
    else:
        sums, srows = k_new, 0          # unread (HAS_SUMS False)
    # contiguous caches: PS is the block size (for the sums row); the cache row is the position itself
    ps = k_cache.shape[1] if paged else block_size
    bt = block_table if paged else cache_seqlens
    launch_kernel(_append_rows, (B, Hkv), k_new, v_new, k_cache, v_cache, cache_seqlens, bt, sums,
                  *strides[0][:3], *strides[1][:3], *strides[2][:3], *strides[3][:3], bt.stride(0), *sums.stride()[:2],
                  Tq, ps, srows, D=D, DV=DV,
                  BD=max(16, next_pow2(D)), BDV=max(16, next_pow2(DV)), PAGED=paged, HAS_SUMS=key_sums is not None,
                  num_warps=1)
    return True
