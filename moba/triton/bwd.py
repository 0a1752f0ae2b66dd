"""The Triton backward: recomputation from the saved log-sum-exp and selection.

* ``_delta``: delta[row] = <dO, O> (- dlse) per (query, head).
* ``_dkdv``: one program per key tile of a block and kv head: the block's own queries of every head of the group,
  causally, then the gathered rows that chose it; no atomics. On sm_90 its Gluon twin
  (``moba.gluon.bwd_dkdv_sm90``) runs where it applies.
* ``_sparse_dq``: gathered tiles of the rows that chose a block; dQ per (row, slot) added atomically into an fp32
  accumulator or, with ``deterministic=True``, written to a buffer of its own.
* ``_own_dq``: the own block, plus the sum over slots; writes dQ.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import gluon
from ..layout import Layout, LayoutTensors
from ..utils import cached, cdiv, new_empty
from .common import LOG2E, gathered_rows, k_tiles, kernel_config, q_tiles, query_tile
from .configs import DKDV_RING
from .grouping import group_entries
from .launch import launch_kernel


@triton.jit
def _delta(O, DO, DLSE, DELTA, n_rows, so_t, so_h, sdo_t, sdo_h,
           Hq: tl.constexpr, DV: tl.constexpr, BR: tl.constexpr, BDV: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta[row] = <dO[row], O[row]> (- dlse[row]) in fp32, row = t * Hq + h."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)   # int64: t * so_t passes 2^31 at 1M tokens
    m_r = o_r < n_rows
    t = o_r // Hq
    h = o_r % Hq
    o_dv = tl.arange(0, BDV)
    m = m_r[:, None] & (o_dv[None, :] < DV)
    b_o = tl.load(O + t[:, None] * so_t + h[:, None] * so_h + o_dv[None, :], mask=m, other=0.).to(tl.float32)
    b_do = tl.load(DO + t[:, None] * sdo_t + h[:, None] * sdo_h + o_dv[None, :], mask=m, other=0.).to(tl.float32)
    b_d = tl.sum(b_o * b_do, 1)
    if HAS_DLSE:
        b_d -= tl.load(DLSE + o_r, mask=m_r, other=0.).to(tl.float32)
    tl.store(DELTA + o_r, b_d, mask=m_r)


@triton.jit
def _rows_load(Q, DO, LSE, DELTA, t, h, row, m_r, sq_t, sq_h, sdo_t, sdo_h,
               D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    """What the dK/dV of BM query rows (token t, head h, flat row t * Hq + h; mask m_r) read: Q^T [BD, BM],
    dO [BM, BDV], lse (log2 units) and delta [BM]."""
    o_d = tl.arange(0, BD)
    o_dv = tl.arange(0, BDV)
    b_qt = tl.load(Q + t[None, :] * sq_t + h[None, :] * sq_h + o_d[:, None],
                   mask=m_r[None, :] & (o_d[:, None] < D), other=0.)
    b_do = tl.load(DO + t[:, None] * sdo_t + h[:, None] * sdo_h + o_dv[None, :],
                   mask=m_r[:, None] & (o_dv[None, :] < DV), other=0.)
    b_lse = tl.load(LSE + row, mask=m_r, other=0.) * 1.4426950408889634
    b_dl = tl.load(DELTA + row, mask=m_r, other=0.)
    return b_qt, b_do, b_lse, b_dl


@triton.jit
def _dkdv_rows(b_dk, b_dv, b_k, b_v, b_qt, b_do, b_lse, b_dl, ok, scale_log2, PREC: tl.constexpr):
    """dK, dV of a key tile [BN] from BM query rows (``_rows_load``) where ``ok`` [BN, BM]. Computed
    key-major (S^T = K Q^T), so that no computed tile needs a transpose."""
    b_st = tl.dot(b_k, b_qt, input_precision=PREC) * scale_log2                      # [BN, BM]
    b_pt = tl.where(ok, tl.exp2(b_st - b_lse[None, :]), 0.)
    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)                         # [BN, BM]
    b_dst = b_pt * (b_dpt - b_dl[None, :])
    b_dk += tl.dot(b_dst.to(b_qt.dtype), tl.trans(b_qt), input_precision=PREC)
    return b_dk, b_dv


@triton.jit
def _dkdv(Q, K, V, DO, LSE, DELTA, DK, DV_, ENT, GRP_OFF, KT_B, KT_N0, BLK_START, BLK_END, OWN_Q0, OWN_Q1,
          QPOS, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_t, sdk_h, sdv_t, sdv_h,
          scale, scale_log2, NB,
          Hq: tl.constexpr, Hkv: tl.constexpr, G: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
          DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
          PREC: tl.constexpr):
    # kv head fastest: the key tiles of early blocks (chosen by the most rows under causal selection) of
    # every kv head start first, so that no heavy program starts late and holds up the end of the launch
    i_kt = tl.program_id(0) // Hkv
    i_g = tl.program_id(0) % Hkv
    i_b = tl.load(KT_B + i_kt)
    n0 = tl.load(KT_N0 + i_kt)
    ke = tl.load(BLK_END + i_b)
    o_n = n0 + tl.arange(0, BN)
    m_n = o_n < ke
    o_d = tl.arange(0, BD)
    o_dv = tl.arange(0, BDV)
    b_k = tl.load(K + o_n[:, None] * sk_t + i_g * sk_h + o_d[None, :],
                  mask=m_n[:, None] & (o_d[None, :] < D), other=0.)       # [BN, BD]
    b_v = tl.load(V + o_n[:, None] * sv_t + i_g * sv_h + o_dv[None, :],
                  mask=m_n[:, None] & (o_dv[None, :] < DV), other=0.)     # [BN, BDV]
    b_dk = tl.zeros([BN, BD], tl.float32)
    b_dv = tl.zeros([BN, BDV], tl.float32)
    # 1) queries whose own block this is (all heads of the group), causally
    r0 = tl.load(OWN_Q0 + i_b)
    r1 = tl.load(OWN_Q1 + i_b)
    # queries before the tile's first key see none of it: start at the first one that does
    r0 = r0 + tl.maximum(n0 - tl.load(QPOS + r0, mask=r1 > r0, other=0), 0)
    for j in range(G):
        i_h = i_g * G + j
        for m0 in range(r0, r1, BM):
            o_m = m0 + tl.arange(0, BM)
            m_m = o_m < r1
            pos = tl.load(QPOS + o_m, mask=m_m, other=-1)
            ok = m_m[None, :] & m_n[:, None] & (o_n[:, None] <= pos[None, :])
            b_qt, b_do, b_lse, b_dl = _rows_load(Q, DO, LSE, DELTA, o_m, o_m * 0 + i_h, o_m * Hq + i_h, m_m,
                                                 sq_t, sq_h, sdo_t, sdo_h, D, DV, BD, BDV)
            b_dk, b_dv = _dkdv_rows(b_dk, b_dv, b_k, b_v, b_qt, b_do, b_lse, b_dl, ok, scale_log2, PREC)
    # 2) gathered rows that chose this block (never masked)
    i_gid = i_g * NB + i_b
    e_lo = tl.load(GRP_OFF + i_gid)
    e_hi = tl.load(GRP_OFF + i_gid + 1)
    # by hand, not by the compiler's pipeliner: the rows' ids are loaded two tiles ahead and their data
    # one tile ahead, into registers, so that both loads overlap a tile's products. (Pipelined by the
    # compiler, the data loads of a tile, which depend on its ids, were issued after the previous
    # tile's products and waited for at once: the load latency was paid on every tile.)
    f, m_e, row, t, h = gathered_rows(ENT, e_lo, e_hi, S, Hq, BM)
    f, m_e1, row1, t1, h1 = gathered_rows(ENT, e_lo + BM, e_hi, S, Hq, BM)
    b_qt, b_do, b_lse, b_dl = _rows_load(Q, DO, LSE, DELTA, t, h, row, m_e, sq_t, sq_h, sdo_t, sdo_h,
                                         D, DV, BD, BDV)
    for e0 in tl.range(e_lo, e_hi, BM, num_stages=1):
        f, m_e2, row2, t2, h2 = gathered_rows(ENT, e0 + 2 * BM, e_hi, S, Hq, BM)
        b_qt1, b_do1, b_lse1, b_dl1 = _rows_load(Q, DO, LSE, DELTA, t1, h1, row1, m_e1, sq_t, sq_h, sdo_t,
                                                 sdo_h, D, DV, BD, BDV)
        ok = m_e[None, :] & m_n[:, None]
        b_dk, b_dv = _dkdv_rows(b_dk, b_dv, b_k, b_v, b_qt, b_do, b_lse, b_dl, ok, scale_log2, PREC)
        b_qt, b_do, b_lse, b_dl, m_e = b_qt1, b_do1, b_lse1, b_dl1, m_e1
        m_e1, row1, t1, h1 = m_e2, row2, t2, h2
    tl.store(DK + o_n[:, None] * sdk_t + i_g * sdk_h + o_d[None, :], (b_dk * scale).to(DK.dtype.element_ty),
             mask=m_n[:, None] & (o_d[None, :] < D))
    tl.store(DV_ + o_n[:, None] * sdv_t + i_g * sdv_h + o_dv[None, :], b_dv.to(DV_.dtype.element_ty),
             mask=m_n[:, None] & (o_dv[None, :] < DV))


@triton.jit
def _sparse_dq(Q, K, V, DO, LSE, DELTA, DQ, ENT, TILE_G, TILE_E0, GRP_END, BLK_START, BLK_END,
               sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, scale, scale_log2, NB,
               Hq: tl.constexpr, S: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
               PREC: tl.constexpr, ATOMIC: tl.constexpr, EVEN: tl.constexpr):
    i_t = tl.program_id(0)
    i_gid = tl.load(TILE_G + i_t)
    e0 = tl.load(TILE_E0 + i_t)
    e1 = tl.load(GRP_END + i_gid)
    if e0 >= e1:
        return
    i_g = i_gid // NB
    i_b = i_gid % NB
    f, m_e, row, t, h = gathered_rows(ENT, e0, e1, S, Hq, BM)
    o_d = tl.arange(0, BD)
    o_dv = tl.arange(0, BDV)
    b_q = tl.load(Q + t[:, None] * sq_t + h[:, None] * sq_h + o_d[None, :],
                  mask=m_e[:, None] & (o_d[None, :] < D), other=0.)
    b_do = tl.load(DO + t[:, None] * sdo_t + h[:, None] * sdo_h + o_dv[None, :],
                   mask=m_e[:, None] & (o_dv[None, :] < DV), other=0.)
    b_lse = tl.load(LSE + row, mask=m_e, other=0.) * 1.4426950408889634
    b_dl = tl.load(DELTA + row, mask=m_e, other=0.)
    ks = tl.load(BLK_START + i_b)
    ke = tl.load(BLK_END + i_b)
    b_dq = tl.zeros([BM, BD], tl.float32)
    for n0 in range(ks, ke, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < ke
        b_k = tl.load(K + o_n[:, None] * sk_t + i_g * sk_h + o_d[None, :],
                      mask=(m_n[:, None] | EVEN) & (o_d[None, :] < D), other=0.)   # [BN, BD]
        b_v = tl.load(V + o_n[:, None] * sv_t + i_g * sv_h + o_dv[None, :],
                      mask=(m_n[:, None] | EVEN) & (o_dv[None, :] < DV), other=0.)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale_log2
        if EVEN:
            b_p = tl.exp2(b_s - b_lse[:, None])
        else:
            b_p = tl.where(m_n[None, :], tl.exp2(b_s - b_lse[:, None]), 0.)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - b_dl[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    b_dq = b_dq * scale
    if ATOMIC:
        tl.atomic_add(DQ + row[:, None] * D + o_d[None, :], b_dq, mask=m_e[:, None] & (o_d[None, :] < D),
                      sem="relaxed")
    else:
        tl.store(DQ + f[:, None] * D + o_d[None, :], b_dq, mask=m_e[:, None] & (o_d[None, :] < D))


@triton.jit
def _own_dq(Q, K, V, DO, LSE, DELTA, DQACC, DQP, SEL, DQ, TILE_Q0, TILE_Q1, TILE_P0, TILE_KB,
            sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t, sdq_h, scale, scale_log2, block_size,
            Hq: tl.constexpr, G: tl.constexpr, S: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr,
            ATOMIC: tl.constexpr):
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    i_g = i_h // G
    o_m, m_m, pos, lo, q0, q1, p0, kb = query_tile(i_t, TILE_Q0, TILE_Q1, TILE_P0, TILE_KB, block_size, BM)
    o_d = tl.arange(0, BD)
    o_dv = tl.arange(0, BDV)
    b_q = tl.load(Q + o_m[:, None] * sq_t + i_h * sq_h + o_d[None, :],
                  mask=m_m[:, None] & (o_d[None, :] < D), other=0.)
    b_do = tl.load(DO + o_m[:, None] * sdo_t + i_h * sdo_h + o_dv[None, :],
                   mask=m_m[:, None] & (o_dv[None, :] < DV), other=0.)
    b_lse = tl.load(LSE + o_m * Hq + i_h, mask=m_m, other=0.) * 1.4426950408889634
    b_dl = tl.load(DELTA + o_m * Hq + i_h, mask=m_m, other=0.)
    b_dq = tl.zeros([BM, BD], tl.float32)
    n_lo = kb + ((p0 - kb) // block_size) * block_size
    n_hi = p0 + (q1 - q0)
    for n0 in range(n_lo, n_hi, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < n_hi
        b_k = tl.load(K + o_n[:, None] * sk_t + i_g * sk_h + o_d[None, :],
                      mask=m_n[:, None] & (o_d[None, :] < D), other=0.)
        b_v = tl.load(V + o_n[:, None] * sv_t + i_g * sv_h + o_dv[None, :],
                      mask=m_n[:, None] & (o_dv[None, :] < DV), other=0.)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale_log2
        ok = m_m[:, None] & (o_n[None, :] >= lo[:, None]) & (o_n[None, :] <= pos[:, None])
        b_p = tl.where(ok, tl.exp2(b_s - b_lse[:, None]), 0.)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - b_dl[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    b_dq = b_dq * scale
    m_qd = m_m[:, None] & (o_d[None, :] < D)
    if ATOMIC:
        # the chosen blocks' contributions were added atomically into the fp32 accumulator
        b_dq += tl.load(DQACC + (o_m * Hq + i_h)[:, None] * D + o_d[None, :], mask=m_qd, other=0.)
    else:
        f_row = (o_m * Hq + i_h) * S
        for s in range(S):
            f = f_row + s
            ok = m_m & (tl.load(SEL + f, mask=m_m, other=-1) >= 0)
            b_dq += tl.load(DQP + f[:, None] * D + o_d[None, :], mask=ok[:, None] & (o_d[None, :] < D), other=0.)
    tl.store(DQ + o_m[:, None] * sdq_t + i_h * sdq_h + o_d[None, :], b_dq.to(DQ.dtype.element_ty), mask=m_qd)


def _own_rows(own_block, NB: int):
    """Each block's own query rows, first and end (own_block, every query row's own block, is sorted)."""
    blocks = torch.arange(NB, device=own_block.device)
    return torch.searchsorted(own_block, blocks), torch.searchsorted(own_block, blocks, right=True)


def backward(q, k, v, out, lse, do, dlse, sel, lay: Layout, lt: LayoutTensors, topk: int, scale: float,
             deterministic: bool, use_gluon: bool = False):
    """Gradients (dq, dk, dv) of the packed forward from its output, log-sum-exp and kept selection. ``use_gluon``:
    dK/dV by the sm_90 Gluon kernel where it applies (16-bit, D == DV in (64, 128), key tiles of 128)."""
    T, Hq, D = q.shape
    Tk, Hkv, DV = v.shape
    G, S, NB = Hq // Hkv, sel.shape[2], lay.n_blocks
    meta, launch = kernel_config(D, DV, q.dtype, "dq")
    meta_k, launch_k = kernel_config(D, DV, q.dtype, "dkdv")
    meta_o, launch_o = kernel_config(D, DV, q.dtype, "own_dq")
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = torch.empty(T, Hq, dtype=torch.float32, device=q.device)
    if T:
        dl = dlse.contiguous() if dlse is not None else delta
        launch_kernel(_delta, (cdiv(T * Hq, 64),), out, do, dl, delta, T * Hq, out.stride(0), out.stride(1),
                      do.stride(0), do.stride(1), Hq=Hq, DV=DV, BR=64, BDV=meta["BDV"], HAS_DLSE=dlse is not None)
    dk = new_empty(Tk, Hkv, D, dtype=k.dtype, device=q.device)
    dv = new_empty(Tk, Hkv, DV, dtype=v.dtype, device=q.device)
    sl2 = scale * LOG2E
    has_sparse = NB > 1 and topk > 1
    Sx = S if has_sparse else 0
    # deterministic (dK/dV sum each group's rows in one order) or past int32 entry ids: a stable sort
    stable = deterministic or sel.numel() >= 2**31
    ent, grp_off, tile_g, tile_e0 = (group_entries(sel, Hkv, NB, meta["BM"], False, stable)[:4] if has_sparse else
                                     (torch.zeros(1, dtype=torch.int64, device=q.device),
                                      torch.zeros(Hkv * NB + 1, dtype=torch.int64, device=q.device), None, None))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               do.stride(0), do.stride(1))
    # dK, dV: one program per key tile of a block (the table comes from the host-side layout: no sync)
    BN = meta_k["BN"]
    kt_b, kt_n0 = cached(("k_tiles", lay.key(), BN, str(q.device)), lambda: k_tiles(lay, BN, q.device))
    n_kt = kt_b.numel()
    own_q0, own_q1 = cached(("own_rows", lay.key(), str(q.device)), lambda: _own_rows(lt.own_block, NB))
    args = (q, k, v, do, lse, delta, dk, dv, ent, grp_off, kt_b, kt_n0, lt.blk_start, lt.blk_end, own_q0, own_q1,
            lt.q_pos, *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), scale, sl2, NB)
    if n_kt and use_gluon and BN == 128 and gluon.usable(q, D, DV, k, v, do):
        from ..gluon.bwd_dkdv_sm90 import dkdv_kernel
        launch_kernel(dkdv_kernel, (n_kt * Hkv,), *args, Hq=Hq, Hkv=Hkv, G=G, S=max(S, 1), D=D, BM=32, BN=BN,
                      NS=DKDV_RING, num_warps=8)
    elif n_kt:
        launch_kernel(_dkdv, (n_kt * Hkv,), *args, Hq=Hq, Hkv=Hkv, G=G, S=max(S, 1), D=D, DV=DV, **meta_k, **launch_k)
    # dQ: chosen blocks (gathered tiles), then own block + sum
    dq_acc = dqp = None
    if has_sparse:
        if deterministic:
            dqp = torch.empty(T * Hq * S, D, dtype=torch.float32, device=q.device)
        else:
            dq_acc = torch.zeros(T * Hq, D, dtype=torch.float32, device=q.device)
        launch_kernel(_sparse_dq, (tile_g.numel(),), q, k, v, do, lse, delta, dq_acc if dqp is None else dqp, ent,
                      tile_g, tile_e0, grp_off[1:], lt.blk_start, lt.blk_end, *strides, scale, sl2, NB, Hq=Hq, S=S, D=D,
                      DV=DV, ATOMIC=dqp is None, EVEN=lay.block_size % meta["BN"] == 0, **meta, **launch)
    # the entry ids are dead now: dQ's output takes their place (peak: entry ids + dQ's fp32 sum, not both + dQ)
    del ent, grp_off, tile_g, tile_e0, args
    dq = new_empty(T, Hq, D, dtype=q.dtype, device=q.device)
    (q0, q1, p0, kb, _), _ = q_tiles(lay, meta_o["BM"], device=q.device)
    if q0.numel():
        dummy = cached(("fp32_one", str(q.device)), lambda: torch.zeros(1, dtype=torch.float32, device=q.device))
        launch_kernel(_own_dq, (q0.numel(), Hq), q, k, v, do, lse, delta, dummy if dq_acc is None else dq_acc,
                      dummy if dqp is None else dqp, sel, dq, q0, q1, p0, kb, *strides, dq.stride(0), dq.stride(1),
                      scale, sl2, lay.block_size, Hq=Hq, G=G, S=Sx, D=D, DV=DV, ATOMIC=dq_acc is not None, **meta_o,
                      **launch_o)
    return dq, dk, dv
