"""The Triton gate: fp32 block means, then the top ``topk - 1`` earlier blocks of every (query, head) by
<q, block mean>, kept in registers as a running top-k (no score matrix in memory).

Scores are fp32; for 16-bit queries the fp32 means are split into hi + lo 16-bit parts so that two tensor-core
products give nearly fp32-exact scores (the ranking matches the fp32 reference). Ties go to the lower block id.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import Layout, LayoutTensors
from ..utils import cdiv, next_pow2
from .common import kernel_config, q_tiles, query_tile
from .configs import GATE_REPLACE_S, GATE_SHARED_BLOCKS
from .launch import launch_kernel


@triton.jit
def mean_scores(b_q, M, p_m, m_load, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """fp32 scores of query rows [R, BD] against the fp32 block means at pointers ``p_m`` [BD, BNB]. With
    SPLIT (16-bit queries) each mean is cut in registers into a 16-bit hi part and the 16-bit remainder:
    two tensor-core dots whose sum is the fp32 score to ~2^-16 relative (the ranking matches fp32)."""
    return scores_of(b_q, tl.load(M + p_m, mask=m_load, other=0.), SPLIT, PREC)


@triton.jit
def scores_of(b_q, b_m, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """`mean_scores` of means already in registers (fp32 [BD, BNB])."""
    if SPLIT:
        b_hi = b_m.to(b_q.dtype)
        b_lo = (b_m - b_hi.to(tl.float32)).to(b_q.dtype)
        b_sc = tl.dot(b_q, b_hi, input_precision=PREC) + tl.dot(b_q, b_lo, input_precision=PREC)
    else:
        b_sc = tl.dot(b_q, b_m, input_precision=PREC)
    return b_sc


@triton.jit
def _gate_topk_g(Q, M, SEL, TILE_Q0, TILE_Q1, TILE_P0, TILE_KB, TILE_FB,
                 sq_t, sq_h, sm_b, sm_h, t0, block_size, CNT, NK, NB,
                 Hq: tl.constexpr, G: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, D: tl.constexpr,
                 BM: tl.constexpr, BNB: tl.constexpr, BD: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
                 R: tl.constexpr = 1, COUNT: tl.constexpr = False, GROUP: tl.constexpr = False):
    """`_gate_topk` for one query tile and the G query heads of one kv head, where every row's earlier blocks fit in
    one chunk of BNB (sequences of at most BNB + 1 blocks): the group's block means are loaded and split
    once, and the heads' query rows in a pipelined loop (the next head's rows load while this head's scores are
    ranked) instead of one program per head. Same scores and the same choices as `_gate_topk`. GROUP (the
    ``gate="group"`` variant): the G heads' scores summed, one choice stored for each of them."""
    i_t = tl.program_id(0)
    i_g = tl.program_id(1)
    o_m, m_m, pos, lo, q0, q1, p0, kb = query_tile(i_t, TILE_Q0, TILE_Q1, TILE_P0, TILE_KB, block_size, BM)
    fb = tl.load(TILE_FB + i_t)
    own = fb + (pos - kb) // block_size                                 # [BM] global own block
    o_d = tl.arange(0, BD)
    o_s = tl.arange(0, SP)
    BIG: tl.constexpr = 2147483647
    b_end = fb + (p0 + (q1 - q0) - 1 - kb) // block_size                 # own block of the last row
    o_b = fb + tl.arange(0, BNB)
    m_b = o_b < b_end
    b_m = tl.load(M + o_b[None, :] * sm_b + i_g * sm_h + o_d[:, None], mask=m_b[None, :] & (o_d[:, None] < D),
                  other=0.)                                               # [BD, BNB] fp32 means
    if SPLIT:
        b_hi = b_m.to(Q.dtype.element_ty)
        b_lo = (b_m - b_hi.to(tl.float32)).to(Q.dtype.element_ty)
    ok = m_m[:, None] & m_b[None, :] & (o_b[None, :] < own[:, None])
    if GROUP:       # a loop of its own: the per-head loop below must stay the kernel's only loop (pipelined)
        b_sum = tl.zeros([BM, BNB], tl.float32)
        for j in tl.range(0, G, num_stages=2):
            b_q = tl.load(Q + o_m[:, None] * sq_t + (i_g * G + j) * sq_h + o_d[None, :],
                          mask=m_m[:, None] & (o_d[None, :] < D), other=0.)  # [BM, BD]
            if SPLIT:
                b_sum += tl.dot(b_q, b_hi, input_precision=PREC) + tl.dot(b_q, b_lo, input_precision=PREC)
            else:
                b_sum += tl.dot(b_q, b_m, input_precision=PREC)
        b_bv, b_bi = topk_merge(tl.full([BM, SP], float("-inf"), tl.float32), tl.full([BM, SP], BIG, tl.int32),
                                 tl.where(ok, b_sum, float("-inf")), o_b, S, SP, BM, True)
        for j in tl.static_range(G):
            _store_choice(SEL, CNT, tl.where(b_bv > float("-inf"), b_bi, -1), o_m, m_m, o_s, t0, i_g * G + j, i_g,
                          NK, NB, Hq, S, R, COUNT)
    else:
        for j in tl.range(0, G, num_stages=2):
            i_h = i_g * G + j
            b_q = tl.load(Q + o_m[:, None] * sq_t + i_h * sq_h + o_d[None, :],
                          mask=m_m[:, None] & (o_d[None, :] < D), other=0.)  # [BM, BD]
            if SPLIT:
                b_sc = tl.dot(b_q, b_hi, input_precision=PREC) + tl.dot(b_q, b_lo, input_precision=PREC)
            else:
                b_sc = tl.dot(b_q, b_m, input_precision=PREC)
            b_sc = tl.where(ok, b_sc, float("-inf"))
            b_bv, b_bi = topk_merge(tl.full([BM, SP], float("-inf"), tl.float32), tl.full([BM, SP], BIG, tl.int32),
                                     b_sc, o_b, S, SP, BM, True)
            _store_choice(SEL, CNT, tl.where(b_bv > float("-inf"), b_bi, -1), o_m, m_m, o_s, t0, i_h, i_g, NK, NB,
                          Hq, S, R, COUNT)


@triton.jit
def topk_merge(b_bv, b_bi, b_sc, o_b, S: tl.constexpr, SP: tl.constexpr, R: tl.constexpr,
                UNROLL: tl.constexpr = False):
    """The S best of (kept scores/ids [R, SP], chunk scores [R, BNB] of blocks ``o_b``), by decreasing
    score, ties to the lower block id: S rounds of max extraction, all in registers. UNROLL: the rounds unrolled
    (no inner loop, so that Triton pipelines a loop around this)."""
    BIG: tl.constexpr = 2147483647
    o_s = tl.arange(0, SP)
    o_bi = o_b.to(tl.int32)
    b_nv = tl.full([R, SP], float("-inf"), tl.float32)
    b_ni = tl.full([R, SP], BIG, tl.int32)
    if UNROLL:
        for r in tl.static_range(S):
            b_bv, b_sc, b_nv, b_ni = _topk_round(b_bv, b_bi, b_sc, o_bi, b_nv, b_ni, o_s, r)
    else:
        for r in range(S):
            b_bv, b_sc, b_nv, b_ni = _topk_round(b_bv, b_bi, b_sc, o_bi, b_nv, b_ni, o_s, r)
    return b_nv, b_ni


@triton.jit
def _topk_round(b_bv, b_bi, b_sc, o_bi, b_nv, b_ni, o_s, r):
    """`topk_merge`'s round r: the best remaining score (ties to the lower id) into column r of (b_nv, b_ni)."""
    BIG: tl.constexpr = 2147483647
    b_mx = tl.maximum(tl.max(b_bv, 1), tl.max(b_sc, 1))
    i1 = tl.min(tl.where(b_bv == b_mx[:, None], b_bi, BIG), 1)
    i2 = tl.min(tl.where(b_sc == b_mx[:, None], o_bi[None, :], BIG), 1)
    idx = tl.minimum(i1, i2)
    b_nv = tl.where(o_s[None, :] == r, b_mx[:, None], b_nv)
    b_ni = tl.where(o_s[None, :] == r, idx[:, None], b_ni)
    b_bv = tl.where(b_bi == idx[:, None], float("-inf"), b_bv)
    b_sc = tl.where(o_bi[None, :] == idx[:, None], float("-inf"), b_sc)
    return b_bv, b_sc, b_nv, b_ni


@triton.jit
def _topk_replace(b_bv, b_bi, b_sc, o_b, S: tl.constexpr, SP: tl.constexpr):
    """The S best of (kept [R, SP], chunk [R, BNB]) as a set, in no order: while some row's best remaining
    candidate beats its worst kept score, that candidate replaces it. Rounds per chunk: the most replacements
    of any row (at most min(S, BNB), few once a row's best S are found), against ``topk_merge``'s S. The
    candidates' block ids exceed every kept id, so a candidate enters only on a strictly higher score and the
    worst kept is the lowest score, ties to the higher id: the same set as ``topk_merge`` keeps."""
    BIG: tl.constexpr = 2147483647
    o_s = tl.arange(0, SP)
    o_bi = o_b.to(tl.int32)
    valid = (o_s < S)[None, :]
    c_mx = tl.max(b_sc, 1)
    w_v = tl.min(tl.where(valid, b_bv, float("inf")), 1)
    go = c_mx > w_v
    while tl.max(go.to(tl.int32), 0) > 0:
        c_id = tl.min(tl.where(b_sc == c_mx[:, None], o_bi[None, :], BIG), 1)
        low = valid & (b_bv == w_v[:, None])
        w_id = tl.max(tl.where(low, b_bi, -1), 1)                        # empty slots: BIG, the first of them
        w_slot = tl.min(tl.where(low & (b_bi == w_id[:, None]), o_s[None, :], SP), 1)
        upd = go[:, None] & (o_s[None, :] == w_slot[:, None])
        b_bv = tl.where(upd, c_mx[:, None], b_bv)
        b_bi = tl.where(upd, c_id[:, None], b_bi)
        b_sc = tl.where(go[:, None] & (o_bi[None, :] == c_id[:, None]), float("-inf"), b_sc)
        c_mx = tl.max(b_sc, 1)
        w_v = tl.min(tl.where(valid, b_bv, float("inf")), 1)
        go = c_mx > w_v
    return b_bv, b_bi


@triton.jit
def _gate_topk(Q, M, SEL, TILE_Q0, TILE_Q1, TILE_P0, TILE_KB, TILE_FB,
               sq_t, sq_h, sm_b, sm_h, t0, block_size, CNT, NK, NB,
               Hq: tl.constexpr, G: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, D: tl.constexpr,
               BM: tl.constexpr, BNB: tl.constexpr, BD: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
               REPLACE: tl.constexpr, R: tl.constexpr = 1, COUNT: tl.constexpr = False, GROUP: tl.constexpr = False):
    """Top S earlier blocks per (query, head) by <q, block mean>, kept in registers (no score matrix): S rounds
    of max extraction per chunk of BNB blocks, or (REPLACE, many slots) a replacement scan and S rounds once.

    Scores are fp32; for 16-bit q the fp32 means are split into hi + lo 16-bit parts so that the tensor
    cores give nearly fp32-exact scores. Ties go to the lower block id. Output by decreasing score.
    COUNT: each chosen (row, slot) entry also counted into the forward grouping's counters CNT (R copies of NK =
    S * Hkv * NB), in the copy `_slot_place`'s counting pass would use for it (its program of 1024 entries, mod R).
    GROUP (the ``gate="group"`` variant): one program per query tile and kv head (axis 1), ranking the sums of its G
    heads' scores and storing the choice for each of them.
    """
    i_t = tl.program_id(0)
    if GROUP:
        i_g = tl.program_id(1)
        i_h = i_g * G
    else:
        i_h = tl.program_id(1)
        i_g = i_h // G
    o_m, m_m, pos, lo, q0, q1, p0, kb = query_tile(i_t, TILE_Q0, TILE_Q1, TILE_P0, TILE_KB, block_size, BM)
    fb = tl.load(TILE_FB + i_t)
    own = fb + (pos - kb) // block_size                                 # [BM] global own block
    o_d = tl.arange(0, BD)
    o_s = tl.arange(0, SP)
    b_q = tl.load(Q + o_m[:, None] * sq_t + i_h * sq_h + o_d[None, :],
                  mask=m_m[:, None] & (o_d[None, :] < D), other=0.)      # [BM, BD]
    BIG: tl.constexpr = 2147483647
    b_bv = tl.full([BM, SP], float("-inf"), tl.float32)                  # best scores
    b_bi = tl.full([BM, SP], BIG, tl.int32)                              # their block ids
    b_end = fb + (p0 + (q1 - q0) - 1 - kb) // block_size                 # own block of the last row
    for c0 in range(fb, b_end, BNB):
        o_b = c0 + tl.arange(0, BNB)
        m_b = o_b < b_end
        p_m = o_b[None, :] * sm_b + i_g * sm_h + o_d[:, None]
        if GROUP:
            b_mn = tl.load(M + p_m, mask=m_b[None, :] & (o_d[:, None] < D), other=0.)
            b_sc = tl.zeros([BM, BNB], tl.float32)
            for j in range(G):
                b_qj = tl.load(Q + o_m[:, None] * sq_t + (i_g * G + j) * sq_h + o_d[None, :],
                               mask=m_m[:, None] & (o_d[None, :] < D), other=0.)
                b_sc += scores_of(b_qj, b_mn, SPLIT, PREC)
        else:
            b_sc = mean_scores(b_q, M, p_m, m_b[None, :] & (o_d[:, None] < D), SPLIT, PREC)   # [BM, BNB]
        ok = m_m[:, None] & m_b[None, :] & (o_b[None, :] < own[:, None])
        b_sc = tl.where(ok, b_sc, float("-inf"))
        if REPLACE:
            b_bv, b_bi = _topk_replace(b_bv, b_bi, b_sc, o_b, S, SP)
        else:
            b_bv, b_bi = topk_merge(b_bv, b_bi, b_sc, o_b, S, SP, BM)
    if REPLACE:   # the kept set in order: S rounds of `topk_merge` against an empty chunk (scores -inf)
        b_bv, b_bi = topk_merge(b_bv, b_bi, tl.full([BM, 2], float("-inf"), tl.float32),
                                 tl.full([2], BIG, tl.int32), S, SP, BM)
    if GROUP:
        for j in tl.static_range(G):
            _store_choice(SEL, CNT, tl.where(b_bv > float("-inf"), b_bi, -1), o_m, m_m, o_s, t0, i_h + j, i_g, NK, NB,
                          Hq, S, R, COUNT)
    else:
        _store_choice(SEL, CNT, tl.where(b_bv > float("-inf"), b_bi, -1), o_m, m_m, o_s, t0, i_h, i_g, NK, NB, Hq, S,
                      R, COUNT)


@triton.jit
def _store_choice(SEL, CNT, b_out, o_m, m_m, o_s, t0, i_h, i_g, NK, NB, Hq: tl.constexpr, S: tl.constexpr,
                  R: tl.constexpr, COUNT: tl.constexpr):
    """A gate's choice for rows o_m of head i_h (block ids [BM, SP], -1 for none) into SEL; COUNT: each chosen entry
    counted into the forward grouping's counters CNT in the copy `_slot_place`'s counting pass would use for it."""
    o_e = (((o_m - t0) * Hq + i_h) * S)[:, None] + o_s[None, :]        # [BM, SP] entry ids (< 2^31 per chunk)
    tl.store(SEL + o_e, b_out.to(SEL.dtype.element_ty), mask=m_m[:, None] & (o_s[None, :] < S))
    if COUNT:
        key = o_s[None, :] * (NK // S) + i_g * NB + b_out
        tl.atomic_add(CNT + ((o_e // 1024) % R) * NK + key, 1, mask=m_m[:, None] & (o_s[None, :] < S) & (b_out >= 0),
                      sem="relaxed")


@triton.jit
def _block_means(K, M, BLK_START, BLK_END, sk_t, sk_h, sm_b, sm_h, D: tl.constexpr, BN: tl.constexpr,
                 BD: tl.constexpr):
    """Mean key of one (block, kv head) over BD of its columns in fp32: one read of the block, no temporary."""
    i_b = tl.program_id(0)
    i_g = tl.program_id(1)
    ks = tl.load(BLK_START + i_b)
    ke = tl.load(BLK_END + i_b)
    o_d = tl.program_id(2) * BD + tl.arange(0, BD)
    acc = tl.zeros([BN, BD], tl.float32)
    for n0 in range(ks, ke, BN):
        o_n = n0 + tl.arange(0, BN)
        acc += tl.load(K + o_n[:, None] * sk_t + i_g * sk_h + o_d[None, :],
                       mask=(o_n[:, None] < ke) & (o_d[None, :] < D), other=0.).to(tl.float32)
    tl.store(M + i_b * sm_b + i_g * sm_h + o_d, tl.sum(acc, 0) / (ke - ks).to(tl.float32), mask=o_d < D)


def block_means(k: torch.Tensor, lay: Layout, lt: LayoutTensors) -> torch.Tensor:
    """``torch_backend.gate.block_means`` in one launch: fp32 [n_blocks, Hkv, D] (the torch version's summation passes
    hold an fp32 copy of up to 2^25 key elements: 64 MiB, as much as the whole output at 8K tokens)."""
    Tk, Hkv, D = k.shape
    out = torch.empty(lay.n_blocks, Hkv, D, dtype=torch.float32, device=k.device)
    if lay.n_blocks:
        # 32 columns per program: with one program per (block, head), short inputs (few blocks and kv heads) ran
        # too few programs, each reading a whole block in turn
        BD = min(32, max(16, next_pow2(D)))
        launch_kernel(_block_means, (lay.n_blocks, Hkv, cdiv(D, BD)), k, out, lt.blk_start, lt.blk_end, k.stride(0),
                      k.stride(1), out.stride(0), out.stride(1), D=D, BN=128, BD=BD, num_warps=4)
    return out


def select_past_blocks(q, k, lay: Layout, lt: LayoutTensors, topk: int, group: bool = False) -> torch.Tensor:
    """The Triton gate alone: int32 [T, Hq, topk - 1] global block ids (as ``torch_backend.gate.select_past_blocks``)."""
    T, Hq, D = q.shape
    S = topk - 1
    sel = torch.full((T, Hq, S), -1, dtype=torch.int32, device=q.device)
    if S and lay.n_blocks > 1 and T:
        meta, launch = kernel_config(D, D, q.dtype, "gate")
        tiles, _ = q_tiles(lay, meta["BM"], device=q.device)
        launch_gate(q, k, lay, lt, S, sel, 0, tiles, meta, launch, group=group)
    return sel


def launch_gate(q, k, lay, lt, S, sel_c, t0, tiles, meta, launch, means=None, count=None, group=False):
    """The gate for query tiles ``tiles`` into ``sel_c`` (rows from t0). ``count``: `grouping.counters`' (cnt, NK,
    R), counted by the gate as it writes the selection. Sequences of at most GATE_SHARED_BLOCKS blocks take
    `_gate_topk_g` (one program per query tile and kv head), others `_gate_topk` (one per query tile and head; per
    kv head with ``group``, the ``gate="group"`` variant: the G heads' scores summed)."""
    q0, q1, p0, kb, fb = tiles
    means = means if means is not None else block_means(k, lay, lt)
    Hq, Hkv = q.shape[1], k.shape[1]
    cnt, NK, R = count if count is not None else (sel_c, 1, 1)
    args = (q, means, sel_c, q0, q1, p0, kb, fb, q.stride(0), q.stride(1), means.stride(0), means.stride(1), t0,
            lay.block_size, cnt, NK, lay.n_blocks)
    kw = dict(Hq=Hq, G=Hq // Hkv, S=S, SP=next_pow2(S), D=q.shape[2], BM=meta["BM"], BNB=GATE_SHARED_BLOCKS - 1,
              BD=meta["BD"], SPLIT=q.dtype != torch.float32, PREC=meta["PREC"], R=R, COUNT=count is not None,
              GROUP=group)
    if lay.most_blocks <= GATE_SHARED_BLOCKS and S < GATE_REPLACE_S:
        launch_kernel(_gate_topk_g, (q0.numel(), Hkv), *args, **kw, **launch)
    else:
        launch_kernel(_gate_topk, (q0.numel(), Hkv if group else Hq), *args, **kw, REPLACE=S >= GATE_REPLACE_S,
                      **launch)
