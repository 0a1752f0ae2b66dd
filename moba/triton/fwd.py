"""The Triton forward: the own block first, then the chosen blocks merged in place, one launch per slot.

* The gate (``gate.py``) picks the top ``topk - 1`` earlier blocks per (query, head), in query chunks; the chosen
  (row, slot) entries are grouped by (slot, kv head, block) (``grouping.py``), so that every key block sees the
  rows that picked it in each slot.
* ``_own_fwd``: one program per tile of consecutive queries of one sequence and one head: causal attention over
  the own block; writes the output and log-sum-exp of every row.
* ``_sparse_fwd``: one launch per slot, one program per tile of up to BM gathered rows of one (slot, kv head,
  block) group; the rows attend the whole block (no mask: chosen blocks are strictly in the past) with an online
  softmax and merge the result into the output and log-sum-exp in place. A row has one entry per slot, so a
  launch never has two programs on one row: no atomics, no partial-output buffer.

On sm_90 with the "gluon" backend, both have warp-specialized persistent twins in ``moba.gluon.fwd_sm90``.
The forward runs in query chunks so that the selection and entry list stay bounded (``_chunk_rows``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import gluon
from ..layout import Layout, LayoutTensors
from ..utils import cached, cdiv, new_empty, poisoned, sm_count, to_device
from .common import LOG2E, gathered_rows, kernel_config, make_q_tiles, online_softmax, q_tiles, query_tile, tile_range
from .configs import (FILL_BYTES, FWD_RING, KEEP_SHARE, OWN_GATE_BLOCKS, OWN_GATE_SLOTS, SELECT_BYTES,
                      SELECT_SHARE)
from .gate import block_means, launch_gate
from .grouping import counters, group_entries
from .launch import launch_kernel


@triton.jit
def _own_fwd(Q, K, V, O, LSE, TILE_Q0, TILE_Q1, TILE_P0, TILE_KB,
             sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, scale_log2, block_size,
             Hq: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
             PREC: tl.constexpr):
    """Causal attention of a query tile over its own block: the first result of every row (the chosen
    blocks are merged in afterwards by ``_sparse_fwd``)."""
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    i_g = i_h // G
    o_m, m_m, pos, lo, q0, q1, p0, kb = query_tile(i_t, TILE_Q0, TILE_Q1, TILE_P0, TILE_KB, block_size, BM)
    o_d = tl.arange(0, BD)
    o_dv = tl.arange(0, BDV)
    b_q = tl.load(Q + o_m[:, None] * sq_t + i_h * sq_h + o_d[None, :],
                  mask=m_m[:, None] & (o_d[None, :] < D), other=0.)
    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.zeros([BM], tl.float32)
    b_acc = tl.zeros([BM, BDV], tl.float32)
    n_lo = kb + ((p0 - kb) // block_size) * block_size
    n_hi = p0 + (q1 - q0)
    lo_last = kb + ((n_hi - 1 - kb) // block_size) * block_size         # own block start of the last row
    for n0 in range(n_lo, n_hi, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < n_hi
        b_k = tl.load(K + o_n[None, :] * sk_t + i_g * sk_h + o_d[:, None],
                      mask=m_n[None, :] & (o_d[:, None] < D), other=0.)
        b_s = tl.dot(b_q, b_k, input_precision=PREC) * scale_log2
        if (n0 < lo_last) | (n0 + BN - 1 > p0):   # only tiles on a block edge or the diagonal need a mask
            ok = (o_n[None, :] >= lo[:, None]) & (o_n[None, :] <= pos[:, None])
            b_s = tl.where(ok, b_s, float("-inf"))
        b_m, b_l, b_acc = online_softmax(b_s, V + o_n[:, None] * sv_t + i_g * sv_h + o_dv[None, :],
                                          m_n[:, None] & (o_dv[None, :] < DV), b_m, b_l, b_acc, PREC, True)
    b_o = b_acc / b_l[:, None]
    tl.store(O + o_m[:, None] * so_t + i_h * so_h + o_dv[None, :], b_o.to(O.dtype.element_ty),
             mask=m_m[:, None] & (o_dv[None, :] < DV))
    tl.store(LSE + o_m * Hq + i_h, (b_m + tl.log2(b_l)) * 0.6931471805599453, mask=m_m)


@triton.jit
def _sparse_fwd(Q, K, V, O, LSE, ENT, TILE_G, TILE_E0, TILE_CUM, GRP_END, BLK_START, BLK_END,
                sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, t0, scale_log2, NB, NG, slot,
                Hq: tl.constexpr, S: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                PREC: tl.constexpr, EVEN: tl.constexpr):
    """Slot ``slot`` of every row: one program per tile of gathered rows of one (slot, kv head, block)
    group; the rows attend the whole block and merge the result into O and LSE in place (a row has one
    entry per slot, so no two programs of a launch touch the same row; slots run one launch after another).
    """
    i_t = tl.load(TILE_CUM + slot * NG) + tl.program_id(0)
    if i_t >= tl.load(TILE_CUM + (slot + 1) * NG):   # the grid is an upper bound of the slot's tiles
        return
    i_gid = tl.load(TILE_G + i_t)
    e0 = tl.load(TILE_E0 + i_t)
    e1 = tl.load(GRP_END + i_gid)
    if e0 >= e1:
        return
    i_g = (i_gid % NG) // NB
    i_b = i_gid % NB
    f, m_e, row, t, h = gathered_rows(ENT, e0, e1, S, Hq, BM)   # f: [BM] (row, slot) ids in this chunk
    t = t0 + t
    o_d = tl.arange(0, BD)
    o_dv = tl.arange(0, BDV)
    b_q = tl.load(Q + t[:, None] * sq_t + h[:, None] * sq_h + o_d[None, :],
                  mask=m_e[:, None] & (o_d[None, :] < D), other=0.)  # [BM, BD]
    ks = tl.load(BLK_START + i_b)
    ke = tl.load(BLK_END + i_b)
    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.zeros([BM], tl.float32)
    b_acc = tl.zeros([BM, BDV], tl.float32)
    for n0 in range(ks, ke, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < ke
        if EVEN:   # chosen blocks are whole (strictly in the past): no key mask
            b_k = tl.load(K + o_n[None, :] * sk_t + i_g * sk_h + o_d[:, None], mask=o_d[:, None] < D, other=0.)
            b_s = tl.dot(b_q, b_k, input_precision=PREC) * scale_log2      # [BM, BN]
        else:
            b_k = tl.load(K + o_n[None, :] * sk_t + i_g * sk_h + o_d[:, None],
                          mask=m_n[None, :] & (o_d[:, None] < D), other=0.)   # [BD, BN]
            b_s = tl.dot(b_q, b_k, input_precision=PREC) * scale_log2
            b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        b_m, b_l, b_acc = online_softmax(b_s, V + o_n[:, None] * sv_t + i_g * sv_h + o_dv[None, :],
                                          (m_n[:, None] | EVEN) & (o_dv[None, :] < DV), b_m, b_l, b_acc, PREC,
                                          False)
    # merge with the row's result so far (own block and earlier slots): log2 units inside, natural in LSE
    p_o = O + t[:, None] * so_t + h[:, None] * so_h + o_dv[None, :]
    m_o = m_e[:, None] & (o_dv[None, :] < DV)
    b_lo = tl.load(LSE + t * Hq + h, mask=m_e, other=0.) * 1.4426950408889634
    b_oo = tl.load(p_o, mask=m_o, other=0.).to(tl.float32)
    b_lb = b_m + tl.log2(b_l)
    b_mx = tl.maximum(b_lo, b_lb)
    b_wo = tl.exp2(b_lo - b_mx)
    b_wb = tl.exp2(b_lb - b_mx)
    b_w = b_wo + b_wb
    b_o = b_oo * (b_wo / b_w)[:, None] + b_acc * (b_wb / (b_w * b_l))[:, None]
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_o)
    tl.store(LSE + t * Hq + h, (b_mx + tl.log2(b_w)) * 0.6931471805599453, mask=m_e)


def _own_tiles(lay: Layout, device):
    """The Gluon own-block kernel's work list: tiles of <= 128 queries of one sequence that never cross a block
    edge (so every row of a tile has the same own block), longest first (most keys to read): device int64 (first
    row, end row, first row's key position, the sequence's first key row, the sequence's first block id)."""
    def make():
        bs, cuts = lay.block_size, []
        for i in range(lay.n_seqs):
            a, b = lay.cu_q[i], lay.cu_q[i + 1]
            off = (lay.cu_k[i + 1] - lay.cu_k[i]) - (b - a)       # key position of the sequence's first query
            cuts.extend(range(a + (-off) % bs, b, bs))            # rows whose position starts a block
        (q0, q1, p0, kb, fb), _ = make_q_tiles(lay, 128, cuts, "cpu")
        keys = p0 + (q1 - q0) - (kb + (p0 - kb) // bs * bs)
        t = torch.stack([q0, q1, p0, kb, fb])[:, torch.argsort(-keys, stable=True)].contiguous()
        t = to_device(t, device)
        return t[0], t[1], t[2], t[3], t[4]
    return cached(("own_tiles", lay.key(), str(device)), make)


def _chunk_rows(T: int, Hq: int, Hkv: int, S: int, NB: int, bm: int, q_bytes: int, keep: bool) -> int:
    """Query rows per chunk of the forward (a multiple of 128, or T)."""
    # a chunk's own memory per row: its entry ids (int32), and its selection unless that is kept whole anyway (keep)
    per_row = Hq * max(S, 1) * (4 if keep else 8)
    budget = max(SELECT_BYTES, q_bytes // (KEEP_SHARE if keep else SELECT_SHARE))
    # ... but enough rows that a (slot, kv head, block) group gets half a tile of them on average (configs.py)
    fill = min(Hkv * NB * bm // (2 * Hq), FILL_BYTES // per_row)
    return min(T, max(128, (budget // per_row) // 128 * 128, -(-fill // 128) * 128),
               (2**31 - 1) // (Hq * max(S, 1)) // 128 * 128)


def forward(q, k, v, lay: Layout, lt: LayoutTensors, topk: int, scale: float, keep: bool = True, means=None,
            sel_dtype=torch.int32, use_gluon: bool = False, group: bool = False):
    """Packed q [T, Hq, D], k/v [Tk, Hkv, D] -> (out [T, Hq, DV], lse fp32 [T, Hq], selection).

    Own block first (``_own_fwd``, or its Gluon twin, writes every row's first result), then per query chunk the
    gate, the grouping by (slot, kv head, block) and one ``_sparse_fwd`` launch (or its Gluon twin's) per slot that
    merges the chosen blocks into the output in place: no partial-output buffer. The selection is kept whole
    (``keep``, for a backward) as ``sel_dtype`` (int16 halves it where the block ids fit, ``layout.sel_dtype``), else
    one chunk's worth. ``use_gluon``: the sm_90 Gluon kernels where they apply (16-bit, D in (64, 128), blocks of
    at least their 128-key tiles, K/V rows viewable as [Tk, Hkv * D]). ``group``: the ``gate="group"`` variant (its
    gate runs in a launch of its own)."""
    T, Hq, D = q.shape
    Hkv, DV = k.shape[1], v.shape[2]
    # no row has more than (its sequence's blocks - 1) earlier blocks: fewer slots, same selection
    most = lay.most_blocks
    G, S, NB = Hq // Hkv, max(0, min(topk - 1, most - 1)), lay.n_blocks
    meta, launch = kernel_config(D, DV, q.dtype, "fwd")
    meta_g, launch_g = kernel_config(D, DV, q.dtype, "gate")
    meta_o, launch_o = kernel_config(D, DV, q.dtype, "own")
    out = new_empty(T, Hq, DV, dtype=q.dtype, device=q.device)
    lse = new_empty(T, Hq, dtype=torch.float32, device=q.device)
    sl2 = scale * LOG2E
    run_sparse = S > 0 and NB > 1 and T > 0
    ws = None    # the Gluon kernels' K/V descriptors, where they run: both read keys in tiles of 128 and were written
    #              and tested for blocks of at least one tile
    if use_gluon and T > 0 and lay.block_size >= 128 and gluon.usable(q, D, DV, k, v, out):
        from ..gluon import fwd_sm90
        ws = fwd_sm90.descriptors(k, v) if fwd_sm90.usable(k, v) else None
    bm = 128 if ws else meta["BM"]
    chunk = _chunk_rows(T, Hq, Hkv, S, NB, bm, q.numel() * q.element_size(), keep)
    shape = (T if keep else chunk, Hq, max(S, 1))
    # the gate inside the Gluon own-block kernel where it fits (configs.OWN_GATE_*) and the input is one query chunk
    own_gate = (ws is not None and run_sparse and chunk >= T and most - 1 <= OWN_GATE_BLOCKS and S <= OWN_GATE_SLOTS
                and not group)
    if run_sparse:
        # the gate writes every (row, head, slot) of each chunk (-1 where no block is chosen): no fill (under
        # MOBA_POISON, block 0 everywhere first, so that an entry it missed would give wrong results)
        sel = torch.zeros(shape, dtype=sel_dtype, device=q.device) if poisoned() else torch.empty(
            shape, dtype=sel_dtype, device=q.device)
        if means is None:   # fp32 block means: once per call, not per query chunk
            means = block_means(k, lay, lt)
    count0 = counters(S, Hkv, NB, q.device) if own_gate else None
    if ws:
        tq = _own_tiles(lay, q.device)
        n = tq[0].numel() * Hq
        gate = ((means, sel, count0[0], means.stride(0), means.stride(1), S * Hkv * NB, NB)
                if own_gate else (lse, lse, lse, 0, 0, 1, 1))
        launch_kernel(fwd_sm90.own_fwd_kernel, (min(n, sm_count(q.device)),), q, *ws, out, lse, *tq, n, lay.block_size,
                      q.stride(0), q.stride(1), out.stride(0), out.stride(1), sl2, *gate, Hq=Hq, G=G, D=D, BN=128,
                      NS=FWD_RING, GATE=own_gate, S=S if own_gate else 1, NBC=16 if most - 1 <= 16 else OWN_GATE_BLOCKS,
                      R=count0[2] if count0 else 1, COUNT=own_gate, num_warps=4)
    else:
        (q0, q1, p0, kb, _), _ = q_tiles(lay, meta_o["BM"], device=q.device)
        if q0.numel():
            launch_kernel(_own_fwd, (q0.numel(), Hq), q, k, v, out, lse, q0, q1, p0, kb, q.stride(0), q.stride(1),
                          k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), sl2,
                          lay.block_size, Hq=Hq, G=G, D=D, DV=DV, **meta_o, **launch_o)
    if not run_sparse:
        return out, lse, torch.full(shape, -1, dtype=sel_dtype, device=q.device)
    g_tiles, g_starts = q_tiles(lay, meta_g["BM"], range(0, T, chunk), q.device)
    NG = Hkv * NB
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        sel_c = sel[t0:t1] if keep else sel[:t1 - t0]
        if own_gate:    # the own-block kernel chose (and counted) the blocks of the one chunk
            count = count0
        else:           # the gate counts its choices into the grouping's counters as it writes them
            i0, i1 = tile_range(g_starts, t0, t1)
            count = counters(S, Hkv, NB, q.device)
            launch_gate(q, k, lay, lt, S, sel_c, t0, [x[i0:i1] for x in g_tiles], meta_g, launch_g, means, count,
                        group and G > 1)
        ent, grp_off, tile_g, tile_e0, tile_cum, *tinfo = group_entries(
            sel_c, Hkv, NB, bm, by_slot=True, blocks=(lt.blk_start, lt.blk_end) if ws else None, cnt=count[0])
        grid = (cdiv((t1 - t0) * Hq, bm) + NG,)      # >= the tiles of one slot
        tables = (ent, tile_g, tile_e0, tile_cum, grp_off[1:], lt.blk_start, lt.blk_end)
        for s in range(S):
            if ws:
                launch_kernel(fwd_sm90.sparse_fwd_kernel, (min(grid[0], sm_count(q.device)),), q, *ws, out, lse,
                              *tables, q.stride(0), q.stride(1), out.stride(0), out.stride(1), t0, sl2, NB, NG, s,
                              tinfo[0], Hq=Hq, S=S, D=D, BN=128, NS=FWD_RING, EVEN=lay.block_size % 128 == 0,
                              num_warps=4)
            else:
                launch_kernel(_sparse_fwd, grid, q, k, v, out, lse, *tables, q.stride(0), q.stride(1), k.stride(0),
                              k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), t0, sl2, NB, NG, s,
                              Hq=Hq, S=S, D=D, DV=DV, EVEN=lay.block_size % meta["BN"] == 0, **meta, **launch)
    return out, lse, sel
