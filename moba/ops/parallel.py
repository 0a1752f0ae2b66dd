"""Triton kernels for MoBA: kernels -> launchers -> autograd.Function -> public entry.

Work is split the way the selection falls (see ../../PERFLOG.md for the why and the numbers):

* gate (``gate.py``): block means and the top ``topk - 1`` earlier blocks per (query, head), in query
  chunks; then the chosen (row, slot) entries are grouped by (slot, kv head, block) with a counting
  sort, so that every key block sees the list of rows that picked it in each slot.
* ``_own_fwd``: one program per tile of consecutive queries of one sequence and one head: causal
  attention over the own block; writes the output and log-sum-exp of every row.
* ``_sparse_fwd``: one launch per slot, one program per tile of up to BM gathered rows of one (slot,
  kv head, block) group; the rows attend the whole block (no mask: chosen blocks are strictly in the
  past) with an online softmax and merge the result into the output and log-sum-exp in place. A row
  has one entry per slot, so a launch never has two programs on one row: no atomics, no partial buffer.
  On sm_90 its warp-specialized Gluon twin ``gluon_fwd_ws.sparse_fwd_ws_kernel`` (see ``FWD_GLUON``).
* backward: ``_dkdv`` (one program per key tile of a block and kv head: the block's own queries of
  every head in the group, causally, then the gathered rows that chose it; no atomics; on sm_90 its
  Gluon twin ``gluon_dkdv.dkdv_kernel``, see ``DKDV_GLUON``), ``_sparse_dq``
  (gathered tiles; dQ per (row, slot) either atomically added into an fp32 accumulator or, with
  ``deterministic=True``, written to a buffer) and ``_own_dq`` (own block plus the sum over slots).

The forward runs in query chunks so that the selection and entry list stay under ``SELECT_BYTES``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .utils import Layout, LayoutTensors, cached, cdiv, new_empty, next_pow2, poisoned, sm_count, to_device

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
PLACE_COPIES = 8         # copies of the forward grouping's counters (atomic contention / memory)
SELECT_BYTES = 1 << 22   # forward query chunk: selection + entry ids (at least; or q's size / SELECT_SHARE)
SELECT_SHARE = 16        # ... without a backward to come
KEEP_SHARE = 2           # ... with one (the selection kept whole for it, so only the entry ids count; PERFLOG 62)
SCAN_SPANS = 8           # `_group`'s scan: one program up to this many spans of groups, else one per span
FILL_BYTES = 1 << 28     # ... or as many rows as fill its groups' tiles by half, up to this much
GATE_REPLACE_S = int(os.environ.get("MOBA_GATE_REPLACE_S", "32"))   # `_gate_topk`'s replacement scan from this many slots
# dK/dV by the Gluon kernel (gluon_dkdv.py; H100: 3.7 ms against `_dkdv`'s 5.0 at fb32k, PERFLOG 31) on
# sm_90 with 16-bit inputs and D == DV in (64, 128): "1" (default; "all" is the same) wherever it applies
# (its GPU test covers Tq == Tk, Tq < Tk, packed and deterministic batches), "0" never. GLUON_NS: its ring of
# row tiles (4 measured 0.5% faster than 3).
DKDV_GLUON = os.environ.get("MOBA_DKDV_GLUON", "1")
GLUON_NS = int(os.environ.get("MOBA_GLUON_NS", "4"))
# The chosen blocks' forward by the warp-specialized Gluon kernel (gluon_fwd_ws.py: a TMA loader warp, two
# consumer warpgroups; H100: 1.64 s against `_sparse_fwd`'s 1.92 at fwd1m, 2% faster at 8K/32K, PERFLOG 35)
# where it applies (sm_90, 16-bit, D == DV in (64, 128), K/V as [T, Hkv * D] rows): "ws" (default) for blocks of
# at least 128 keys (its key tiles are 128 rows), "all" for every block size, "0" never.
# GLUON_WS_NS: its ring of 128-key tiles (2 and 3 measured the same).
FWD_GLUON = os.environ.get("MOBA_FWD_GLUON", "ws")
GLUON_WS_NS = int(os.environ.get("MOBA_GLUON_WS_NS", "2"))
# GLUON_WS_PERSIST: "1" (default; its GPU tests passed on an H100, PERFLOG 41) its persistent form (one program per
# SM looping over the tiles; H100: 0.426 -> 0.373 ms at fwd8k, 1.775 -> 1.491 at fwd32k), "0" one program per tile.
GLUON_WS_PERSIST = os.environ.get("MOBA_GLUON_WS_PERSIST", "1")
# GLUON_WS_PF: "1" (default) the persistent form's consumers copy the next tile's Q rows and the merge's O rows
# ahead (cp.async) where the extra 64 KB of shared memory fits (D 128 with a ring of 2, or D 64); H100: 1.651 ->
# 1.534 s at fwd1m, 1.514 -> 1.464 ms for the slots at fwd32k, 0.381 -> 0.374 at fwd8k (PERFLOG 42). "0" they
# load them when needed.
GLUON_WS_PF = os.environ.get("MOBA_GLUON_WS_PF", "1")
# GLUON_WS_SST: "1" (default) with PF, the merged rows stored through shared memory in 16-byte pieces (H100: the
# slots 0.371 -> 0.343 ms at fwd8k, 1.460 -> 1.364 at fwd32k; PERFLOG 44), "0" from the product's register layout.
GLUON_WS_SST = os.environ.get("MOBA_GLUON_WS_SST", "1")
# GLUON_WS_QE: "1" (default; its GPU tests passed on an H100) with SST, the persistent consumers copy the next tile's Q
# rows before the key loop instead of after it, reading a flat tile table (`gluon_fwd_ws._consumer_qe`; H100: the
# slots 0.350 -> 0.302 ms at fwd8k, 1.368 -> 1.180 at fwd32k, PERFLOG 45); "0" `_consumer_pf`.
GLUON_WS_QE = os.environ.get("MOBA_GLUON_WS_QE", "1")
# GATE_COUNT: "1" (default; the GPU tests passed with it) the forward's gate also counts each chosen entry into the
# grouping's counters (`_gate_topk`'s COUNT), so that `_group` skips `_slot_place`'s counting pass (H100, fwd8k: gate
# 0.047 -> 0.051 ms, grouping 0.040 -> 0.025; kernels as CUDA graphs 0.524 -> 0.509; PERFLOG 45); "0" that pass.
GATE_COUNT = os.environ.get("MOBA_GATE_COUNT", "1")
# GATE_HEADS: "1" (default; its GPU tests passed on an H100) where every sequence has at most 33 blocks, the gate's
# program takes a query tile for all the query heads of one kv head (`_gate_topk_g`: the block means loaded once, the
# heads' rows in a pipelined loop; H100, fwd8k: gate 0.051 -> 0.041 ms, PERFLOG 49); "0" one program per query tile
# and head.
GATE_HEADS = os.environ.get("MOBA_GATE_HEADS", "1")
# GLUON_OWN_SST: "1" (default; its GPU tests passed on an H100) the own-block kernel's rows stored the same way (H100:
# 0.157 -> 0.124 ms at fwd8k, 0.550 -> 0.446 at fwd32k; PERFLOG 45); "0" from the product's register layout.
GLUON_OWN_SST = os.environ.get("MOBA_GLUON_OWN_SST", "1")
# GLUON_OWN_QE: "1" (default; its GPU tests passed on an H100) with GLUON_OWN_SST, the own-block kernel's next Q rows
# copied before the key loop (`gluon_fwd_ws._consumer_own_qe`; H100: 0.125 -> 0.121 ms at fwd8k, 0.446 -> 0.432 at
# fwd32k, PERFLOG 45); "0" loaded at each item's start.
GLUON_OWN_QE = os.environ.get("MOBA_GLUON_OWN_QE", "1")
# GLUON_OWN_GATE: "1" (default; its GPU tests passed on an H100) the gate inside the own-block kernel
# (`gluon_fwd_ws._own_gate`: from the Q rows it has in shared memory, one launch and one read of Q fewer) where the
# input is one query chunk of sequences of at most 33 blocks and topk is at most 9 (H100, fwd8k: own kernel 0.117 ->
# 0.145 ms and no gate launch; kernels as CUDA graphs 0.504 -> 0.485 ms, PERFLOG 49); "0" the gate's own launch.
GLUON_OWN_GATE = os.environ.get("MOBA_GLUON_OWN_GATE", "1")
# GLUON_OWN: "1" (default; its GPU tests passed on an H100, PERFLOG 42) the own block by the same kind of kernel
# (`gluon_fwd_ws.own_fwd_ws_persistent_kernel`; H100: 0.166 -> 0.157 ms at fwd8k, 0.625 -> 0.550 at fwd32k) where
# the Gluon forward runs (FWD_GLUON), "0" by `_own_fwd`.
GLUON_OWN = os.environ.get("MOBA_GLUON_OWN", "1")
# WS_TIME: None, or an int64 tensor [S, programs, 2, 9] the persistent Gluon forward (with PF) fills with each
# consumer's cycles in 8 phases of its tiles and its tiles, per slot (timing builds:
# `benchmarks/ws_phases.py`; results stay right)
WS_TIME = None
# Timing ablations of the Gluon forward (benchmarks only, results wrong when set; gluon_fwd_ws.py): a bit mask
WS_ABLATE = int(os.environ.get("MOBA_WS_ABLATE", "0"))


MAX_HEAD_DIM = 128


def supports(q: torch.Tensor, v: torch.Tensor | None = None) -> bool:
    """Inputs the kernels take: 16/32-bit floats, head dims up to 128 (larger ones go to "torch")."""
    dv = q.shape[-1] if v is None else v.shape[-1]
    return q.dtype in (torch.float16, torch.bfloat16, torch.float32) and max(q.shape[-1], dv) <= MAX_HEAD_DIM


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _query_tile(i_t, TILE_Q0, TILE_Q1, TILE_P0, TILE_KB, block_size, BM: tl.constexpr):
    """A tile of <= BM consecutive queries of one sequence: rows, row mask, key position of each row,
    start of each row's own block, and the tile's first/end row, first position and sequence key start."""
    q0 = tl.load(TILE_Q0 + i_t)          # first query row of the tile (packed)
    q1 = tl.load(TILE_Q1 + i_t)          # one past the last
    p0 = tl.load(TILE_P0 + i_t)          # key row of the first query's position
    kb = tl.load(TILE_KB + i_t)          # first key row of the sequence
    o_m = q0 + tl.arange(0, BM)
    pos = p0 + tl.arange(0, BM)                                         # [BM] own key row
    lo = kb + ((pos - kb) // block_size) * block_size                   # [BM] own block start
    return o_m, o_m < q1, pos, lo, q0, q1, p0, kb


@triton.jit
def _gathered_rows(ENT, e0, e1, S: tl.constexpr, Hq: tl.constexpr, BM: tl.constexpr):
    """Up to BM gathered (row, slot) entries e0..e1-1: their ids, mask, flat row (t * Hq + h), t and h."""
    o_e = e0 + tl.arange(0, BM)
    m_e = o_e < e1
    f = tl.load(ENT + o_e, mask=m_e, other=0).to(tl.int64)   # int64: t * stride passes 2^31 at 1M tokens
    row = f // S
    return f, m_e, row, row // Hq, row % Hq


@triton.jit
def _mean_scores(b_q, M, p_m, m_load, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """fp32 scores of query rows [R, BD] against the fp32 block means at pointers ``p_m`` [BD, BNB]. With
    SPLIT (16-bit queries) each mean is cut in registers into a 16-bit hi part and the 16-bit remainder:
    two tensor-core dots whose sum is the fp32 score to ~2^-16 relative (the ranking matches fp32)."""
    b_m = tl.load(M + p_m, mask=m_load, other=0.)
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
                 R: tl.constexpr = 1, COUNT: tl.constexpr = False):
    """`_gate_topk` for one query tile and the G query heads of one kv head, where every row's earlier blocks fit in
    one chunk of BNB (sequences of at most BNB + 1 blocks; GATE_HEADS): the group's block means are loaded and split
    once, and the heads' query rows in a pipelined loop (the next head's rows load while this head's scores are
    ranked) instead of one program per head. Same scores and the same choices as `_gate_topk`."""
    i_t = tl.program_id(0)
    i_g = tl.program_id(1)
    o_m, m_m, pos, lo, q0, q1, p0, kb = _query_tile(i_t, TILE_Q0, TILE_Q1, TILE_P0, TILE_KB, block_size, BM)
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
    for j in tl.range(0, G, num_stages=2):
        i_h = i_g * G + j
        b_q = tl.load(Q + o_m[:, None] * sq_t + i_h * sq_h + o_d[None, :],
                      mask=m_m[:, None] & (o_d[None, :] < D), other=0.)  # [BM, BD]
        if SPLIT:
            b_sc = tl.dot(b_q, b_hi, input_precision=PREC) + tl.dot(b_q, b_lo, input_precision=PREC)
        else:
            b_sc = tl.dot(b_q, b_m, input_precision=PREC)
        b_sc = tl.where(ok, b_sc, float("-inf"))
        b_bv, b_bi = _topk_merge(tl.full([BM, SP], float("-inf"), tl.float32), tl.full([BM, SP], BIG, tl.int32),
                                 b_sc, o_b, S, SP, BM, True)
        _store_choice(SEL, CNT, tl.where(b_bv > float("-inf"), b_bi, -1), o_m, m_m, o_s, t0, i_h, i_g, NK, NB, Hq, S,
                      R, COUNT)


@triton.jit
def _topk_merge(b_bv, b_bi, b_sc, o_b, S: tl.constexpr, SP: tl.constexpr, R: tl.constexpr,
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
    """`_topk_merge`'s round r: the best remaining score (ties to the lower id) into column r of (b_nv, b_ni)."""
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
    of any row (at most min(S, BNB), few once a row's best S are found), against ``_topk_merge``'s S. The
    candidates' block ids exceed every kept id, so a candidate enters only on a strictly higher score and the
    worst kept is the lowest score, ties to the higher id: the same set as ``_topk_merge`` keeps."""
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
def _online_softmax(b_s, p_v, m_v, b_m, b_l, b_acc, PREC: tl.constexpr, SAFE: tl.constexpr):
    """One key tile of a streaming softmax: scores ``b_s`` [R, BN] (log2 units, -inf where masked), the
    V tile at pointers ``p_v`` [BN, BDV] (mask ``m_v``, loaded after the scores as before) and the running
    max, sum and output. SAFE: rows may still have seen no visible key (their max stays -inf)."""
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    if SAFE:
        b_mz = tl.where(b_mn == float("-inf"), 0., b_mn)
    else:
        b_mz = b_mn
    b_p = tl.exp2(b_s - b_mz[:, None])
    b_a = tl.exp2(b_m - b_mz)
    b_l = b_l * b_a + tl.sum(b_p, 1)
    b_v = tl.load(p_v, mask=m_v, other=0.)
    b_acc = b_acc * b_a[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
    return b_mn, b_l, b_acc


@triton.jit
def _gate_topk(Q, M, SEL, TILE_Q0, TILE_Q1, TILE_P0, TILE_KB, TILE_FB,
               sq_t, sq_h, sm_b, sm_h, t0, block_size, CNT, NK, NB,
               Hq: tl.constexpr, G: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, D: tl.constexpr,
               BM: tl.constexpr, BNB: tl.constexpr, BD: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
               REPLACE: tl.constexpr, R: tl.constexpr = 1, COUNT: tl.constexpr = False):
    """Top S earlier blocks per (query, head) by <q, block mean>, kept in registers (no score matrix): S rounds
    of max extraction per chunk of BNB blocks, or (REPLACE, many slots) a replacement scan and S rounds once.

    Scores are fp32; for 16-bit q the fp32 means are split into hi + lo 16-bit parts so that the tensor
    cores give nearly fp32-exact scores. Ties go to the lower block id. Output by decreasing score.
    COUNT: each chosen (row, slot) entry also counted into the forward grouping's counters CNT (R copies of NK =
    S * Hkv * NB), in the copy `_slot_place`'s counting pass would use for it (its program of 1024 entries, mod R).
    """
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    i_g = i_h // G
    o_m, m_m, pos, lo, q0, q1, p0, kb = _query_tile(i_t, TILE_Q0, TILE_Q1, TILE_P0, TILE_KB, block_size, BM)
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
        b_sc = _mean_scores(b_q, M, p_m, m_b[None, :] & (o_d[:, None] < D), SPLIT, PREC)   # [BM, BNB]
        ok = m_m[:, None] & m_b[None, :] & (o_b[None, :] < own[:, None])
        b_sc = tl.where(ok, b_sc, float("-inf"))
        if REPLACE:
            b_bv, b_bi = _topk_replace(b_bv, b_bi, b_sc, o_b, S, SP)
        else:
            b_bv, b_bi = _topk_merge(b_bv, b_bi, b_sc, o_b, S, SP, BM)
    if REPLACE:   # the kept set in order: S rounds of `_topk_merge` against an empty chunk (scores -inf)
        b_bv, b_bi = _topk_merge(b_bv, b_bi, tl.full([BM, 2], float("-inf"), tl.float32),
                                 tl.full([2], BIG, tl.int32), S, SP, BM)
    _store_choice(SEL, CNT, tl.where(b_bv > float("-inf"), b_bi, -1), o_m, m_m, o_s, t0, i_h, i_g, NK, NB, Hq, S, R,
                  COUNT)


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
    f, m_e, row, t, h = _gathered_rows(ENT, e0, e1, S, Hq, BM)   # f: [BM] (row, slot) ids in this chunk
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
        b_m, b_l, b_acc = _online_softmax(b_s, V + o_n[:, None] * sv_t + i_g * sv_h + o_dv[None, :],
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
    o_m, m_m, pos, lo, q0, q1, p0, kb = _query_tile(i_t, TILE_Q0, TILE_Q1, TILE_P0, TILE_KB, block_size, BM)
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
        b_m, b_l, b_acc = _online_softmax(b_s, V + o_n[:, None] * sv_t + i_g * sv_h + o_dv[None, :],
                                          m_n[:, None] & (o_dv[None, :] < DV), b_m, b_l, b_acc, PREC, True)
    b_o = b_acc / b_l[:, None]
    tl.store(O + o_m[:, None] * so_t + i_h * so_h + o_dv[None, :], b_o.to(O.dtype.element_ty),
             mask=m_m[:, None] & (o_dv[None, :] < DV))
    tl.store(LSE + o_m * Hq + i_h, (b_m + tl.log2(b_l)) * 0.6931471805599453, mask=m_m)


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
    f, m_e, row, t, h = _gathered_rows(ENT, e_lo, e_hi, S, Hq, BM)
    f, m_e1, row1, t1, h1 = _gathered_rows(ENT, e_lo + BM, e_hi, S, Hq, BM)
    b_qt, b_do, b_lse, b_dl = _rows_load(Q, DO, LSE, DELTA, t, h, row, m_e, sq_t, sq_h, sdo_t, sdo_h,
                                         D, DV, BD, BDV)
    for e0 in tl.range(e_lo, e_hi, BM, num_stages=1):
        f, m_e2, row2, t2, h2 = _gathered_rows(ENT, e0 + 2 * BM, e_hi, S, Hq, BM)
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
    f, m_e, row, t, h = _gathered_rows(ENT, e0, e1, S, Hq, BM)
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
    o_m, m_m, pos, lo, q0, q1, p0, kb = _query_tile(i_t, TILE_Q0, TILE_Q1, TILE_P0, TILE_KB, block_size, BM)
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


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------
# Tile sizes and launch options per kernel: (BM rows, BN keys, num_warps, num_stages); None: GPU_DEFAULT.
# Benchmarks and tuning scripts (benchmarks/tune.py) may set these; see PERFLOG.md for what was measured.
KINDS = ("gate", "fwd", "own", "dkdv", "dq", "own_dq")
CONFIG = dict.fromkeys(KINDS)
GPU_DEFAULT = {"gate": (128, 64, 8, 3), "fwd": (64, 64, 4, 3), "own": (64, 64, 4, 3),
               "dkdv": (32, 128, 8, 3), "dq": (64, 64, 4, 2), "own_dq": (64, 32, 4, 3)}


def _cfg(D: int, DV: int, dtype, kind: str = "fwd"):
    BD, BDV = max(16, next_pow2(D)), max(16, next_pow2(DV))
    BM, BN, warps, stages = CONFIG[kind] if CONFIG[kind] is not None else GPU_DEFAULT[kind]
    return (dict(BM=BM, BN=BN, BD=BD, BDV=BDV, PREC="ieee" if dtype == torch.float32 else "tf32"),
            dict(num_warps=warps, num_stages=stages))


def _q_tiles(lay: Layout, BM: int, cuts=(), device="cpu"):
    cuts = tuple(cuts)
    return cached(("q_tiles", lay.key(), BM, cuts, str(device)), lambda: _make_q_tiles(lay, BM, cuts, device))


def _make_q_tiles(lay: Layout, BM: int, cuts=(), device="cpu"):
    """Tiles of <= BM consecutive queries of one sequence, also cut at the rows in ``cuts``.

    Built on the host from the layout (no device sync) and copied once. Returns device int64 tensors
    (first row, end row, first row's key position, the sequence's first key row, its first block id)
    and the host list of first rows (to find the tiles of a row range with bisect).
    """
    bounds = sorted(set(lay.cu_q) | {c for c in cuts if 0 < c < lay.total_q})
    q0, q1, p0, kb, fb = [], [], [], [], []
    i = 0
    for a, b in zip(bounds, bounds[1:]):
        while lay.cu_q[i + 1] <= a:
            i += 1
        shift = lay.cu_k[i] + (lay.cu_k[i + 1] - lay.cu_k[i]) - (lay.cu_q[i + 1] - lay.cu_q[i]) - lay.cu_q[i]
        for r in range(a, b, BM):
            q0.append(r)
            q1.append(min(r + BM, b))
            p0.append(r + shift)
            kb.append(lay.cu_k[i])
            fb.append(lay.blk_off[i])
    t = torch.tensor([q0, q1, p0, kb, fb], dtype=torch.int64).reshape(5, -1)
    t = to_device(t, device)
    return (t[0], t[1], t[2], t[3], t[4]), q0


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
        (q0, q1, p0, kb, fb), _ = _make_q_tiles(lay, 128, cuts, "cpu")
        keys = p0 + (q1 - q0) - (kb + (p0 - kb) // bs * bs)
        t = torch.stack([q0, q1, p0, kb, fb])[:, torch.argsort(-keys, stable=True)].contiguous()
        t = to_device(t, device)
        return t[0], t[1], t[2], t[3], t[4]
    return cached(("own_tiles", lay.key(), str(device)), make)


def _k_tiles(lay: Layout, BN: int, device):
    """(block id, first key row) of every tile of <= BN keys inside one key block, ordered by the block's
    place in its sequence: early blocks, which the most rows can choose, first (longest work first)."""
    tiles = []
    for i in range(lay.n_seqs):
        for j, b in enumerate(range(lay.blk_off[i], lay.blk_off[i + 1])):
            st = lay.cu_k[i] + j * lay.block_size
            en = min(st + lay.block_size, lay.cu_k[i + 1])
            tiles.extend((j, b, n0) for n0 in range(st, en, BN))
    tiles.sort(key=lambda x: x[0])                                       # stable: sequences keep their order
    kt_b, kt_n0 = [x[1] for x in tiles], [x[2] for x in tiles]
    t = to_device(torch.tensor([kt_b, kt_n0], dtype=torch.int64).reshape(2, -1), device)
    return t[0], t[1]


def _tile_range(starts: list, t0: int, t1: int):
    import bisect
    return bisect.bisect_left(starts, t0), bisect.bisect_left(starts, t1)


@triton.jit
def _group_keys(SEL, KEY, n_ent, Hq: tl.constexpr, S: tl.constexpr, G: tl.constexpr, NB: tl.constexpr,
                NG: tl.constexpr, BLOCK: tl.constexpr):
    """Sort key of every (row, slot) entry: the group kv_head * NB + block, or NG for an empty slot."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n_ent
    b = tl.load(SEL + o, mask=m, other=-1)
    h = (o // S) % Hq
    tl.store(KEY + o, tl.where(b >= 0, b + (h // G) * NB, NG).to(tl.int32), mask=m)


@triton.jit
def _bisect_right(A, n, x, BLOCK: tl.constexpr, ROUNDS: tl.constexpr = 40):
    """For each x, the first index i of the sorted A[0:n] with A[i] > x; n if none. A vectorised binary
    search of a fixed ROUNDS rounds (n < 2^ROUNDS)."""
    lo = tl.zeros([BLOCK], tl.int64)
    hi = tl.zeros([BLOCK], tl.int64) + n
    for _ in range(ROUNDS):
        mid = (lo + hi) // 2
        live = mid < hi
        go = live & (tl.load(A + mid, mask=live, other=0) <= x)
        lo = tl.where(go, mid + 1, lo)
        hi = tl.where(go | ~live, hi, mid)
    return lo


@triton.jit
def _tile_index(GRP_OFF, TILE_END, TILE_G, TILE_E0, NG, n_max, TINFO, BLK_START, BLK_END, NB, BM: tl.constexpr,
                BLOCK: tl.constexpr, ROUNDS: tl.constexpr, INFO: tl.constexpr = False):
    """Tile i: its group (the first g with TILE_END[g] > i) and first entry; past the last real tile an
    empty range of the last group. INFO: also the flat table TINFO[i] = (first entry, end entry, first key, end
    key) as int32 (the block g % NB; the Gluon forward's QE consumers read it with no chain of loads)."""
    _tile_index_at(tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK), GRP_OFF, TILE_END, TILE_G, TILE_E0,
                   NG, n_max, TINFO, BLK_START, BLK_END, NB, BM, BLOCK, ROUNDS, INFO)


@triton.jit
def _tile_index_at(i, GRP_OFF, TILE_END, TILE_G, TILE_E0, NG, n_max, TINFO, BLK_START, BLK_END, NB, BM: tl.constexpr,
                   BLOCK: tl.constexpr, ROUNDS: tl.constexpr, INFO: tl.constexpr):
    lo = _bisect_right(TILE_END, NG, i, BLOCK, ROUNDS)
    real = lo < NG
    g = tl.minimum(lo, NG - 1)
    first_tile = tl.load(TILE_END + g - 1, mask=g > 0, other=0)
    e0 = tl.load(GRP_OFF + g) + (i - first_tile) * BM
    e0 = tl.where(real, e0, tl.load(GRP_OFF + g + 1))
    m = i < n_max
    tl.store(TILE_G + i, g, mask=m)
    tl.store(TILE_E0 + i, e0, mask=m)
    if INFO:
        b = g % NB
        tl.store(TINFO + 4 * i, e0.to(tl.int32), mask=m)
        tl.store(TINFO + 4 * i + 1, tl.load(GRP_OFF + g + 1).to(tl.int32), mask=m)
        tl.store(TINFO + 4 * i + 2, tl.load(BLK_START + b).to(tl.int32), mask=m)
        tl.store(TINFO + 4 * i + 3, tl.load(BLK_END + b).to(tl.int32), mask=m)


@triton.jit
def _scatter_index(SEL, CNT, ENT, n_ent, NK, n_sc, GRP_OFF, TILE_END, TILE_G, TILE_E0, n_max, TINFO, BLK_START,
                   BLK_END, NBK, Hq: tl.constexpr, S: tl.constexpr, G: tl.constexpr, NB: tl.constexpr,
                   NG: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr, BM: tl.constexpr, ROUNDS: tl.constexpr,
                   INFO: tl.constexpr):
    """`_slot_place`'s scatter (programs 0 .. n_sc - 1) and `_tile_index` (the programs after) in one launch: both
    read only the scan's results."""
    pid = tl.program_id(0)
    if pid < n_sc:
        _place_at(pid, SEL, CNT, ENT, n_ent, NK, Hq, S, G, NB, NG, R, True, BLOCK)
    else:
        _tile_index_at((pid - n_sc).to(tl.int64) * BLOCK + tl.arange(0, BLOCK), GRP_OFF, TILE_END, TILE_G, TILE_E0,
                       NK, n_max, TINFO, BLK_START, BLK_END, NBK, BM, BLOCK, ROUNDS, INFO)


def _copies(NK: int) -> int:
    """Copies of the grouping's NK counters: PLACE_COPIES (less atomic contention), one for very many groups."""
    return PLACE_COPIES if NK <= 1 << 20 else 1


def _counters(S: int, Hkv: int, NB: int, device) -> tuple:
    """Zeroed counters for the forward's grouping by (slot, kv head, block), to be counted by the gate
    (GATE_COUNT): (cnt, NK, R)."""
    NK = S * Hkv * NB
    return torch.zeros(_copies(NK) * NK, dtype=torch.int32, device=device), NK, _copies(NK)


def _group(sel: torch.Tensor, Hkv: int, NB: int, BM: int, by_slot: bool, stable: bool = False, blocks=None,
           cnt=None):
    """The chosen (row, slot) entries grouped on the device, without a host sync: by (slot, kv head, block)
    for the forward's one launch per slot, else by (kv head, block) as the backward reads them.

    sel int32 [n, Hq, S] -> ent (the valid entries' ids, each group's together), grp_off int64 [NK + 1],
    the tile table (group id and first entry of each of an upper bound of tiles of BM entries; tiles past
    the last real one get an empty range and exit at once) and tile_cum int64 [NK + 1] (tiles before each
    group: slot s owns tiles tile_cum[s*NG] .. tile_cum[(s+1)*NG]). A counting sort (int32 ids, 4 bytes per
    entry besides sel; in no fixed order within a group: a row's result does not depend on the other
    rows of its tile); ``stable``: the ids by a stable sort instead (int64; the deterministic backward,
    whose dK/dV sum each group's rows in entry order). ``blocks`` (the blocks' first and end keys): also the
    flat tile table (int32 [tiles, 4], `_tile_index`'s TINFO), as a sixth result. ``cnt``: the counters already
    counted (`_counters`, by the gate), so the counting pass is skipped.
    """
    assert not (stable and by_slot)
    n, Hq, S = sel.shape
    G, NG = Hq // Hkv, Hkv * NB
    NK = S * NG if by_slot else NG
    dev = sel.device
    n_ent = n * Hq * S
    R = _copies(NK)
    counted = cnt is not None
    cnt = cnt if counted else torch.zeros(R * NK, dtype=torch.int32, device=dev)
    ent = None if stable else torch.empty(max(n_ent, 1), dtype=torch.int32, device=dev)
    grp_off = torch.empty(NK + 1, dtype=torch.int64, device=dev)
    tile_cum = torch.empty(NK + 1, dtype=torch.int64, device=dev)
    n_max = cdiv(n_ent, BM) + NK                                          # >= real tiles
    tile_g = torch.empty(n_max, dtype=torch.int64, device=dev)
    tile_e0 = torch.empty(n_max, dtype=torch.int64, device=dev)
    grid = (cdiv(n_ent, 1024),)
    kw = dict(Hq=Hq, S=S, G=G, NB=NB, NG=NG if by_slot else 0, R=R, BLOCK=1024)
    if n_ent and not counted:
        _slot_place[grid](sel, cnt, cnt if stable else ent, n_ent, NK, SCATTER=False, **kw)   # writes no ids
    blk = 2048 // R
    n_span = cdiv(NK, blk)
    if n_span > SCAN_SPANS:     # many groups (small blocks, many slots): the scan in parallel spans
        part = torch.empty(n_span, 2, dtype=torch.int64, device=dev)
        _scan_part[(n_span,)](cnt, part, NK, BM=BM, R=R, BLOCK=blk)
        base = part.cumsum(0) - part
        _slot_scan[(n_span,)](cnt, grp_off, tile_cum, base, NK, BM=BM, R=R, BLOCK=blk, SPLIT=True)
    else:
        _slot_scan[(1,)](cnt, grp_off, tile_cum, cnt, NK, BM=BM, R=R, BLOCK=blk, SPLIT=False)
    if stable:
        key = torch.empty(n_ent, dtype=torch.int32, device=dev)
        if n_ent:
            _group_keys[grid](sel, key, n_ent, Hq=Hq, S=S, G=G, NB=NB, NG=NG, BLOCK=1024)
        ent = torch.sort(key, stable=True).indices
    tinfo = torch.empty(n_max, 4, dtype=torch.int32, device=dev) if blocks is not None else tile_g
    tables = (grp_off, tile_cum[1:], tile_g, tile_e0)
    info = dict(BM=BM, BLOCK=1024, ROUNDS=NK.bit_length(), INFO=blocks is not None)
    blks = blocks if blocks is not None else (tile_g, tile_g)
    n_ti = cdiv(n_max, 1024)
    if stable or not n_ent:
        _tile_index[(n_ti,)](*tables, NK, n_max, tinfo, *blks, NB, **info)
    else:   # the scatter and the tile table in one launch
        _scatter_index[(grid[0] + n_ti,)](sel, cnt, ent, n_ent, NK, grid[0], *tables, n_max, tinfo, *blks, NB, **kw,
                                          **{k: v for k, v in info.items() if k != "BLOCK"})
    if blocks is not None:
        return ent, grp_off, tile_g, tile_e0, tile_cum, tinfo
    return ent, grp_off, tile_g, tile_e0, tile_cum


@triton.jit
def _slot_place(SEL, CNT, ENT, n_ent, NK, Hq: tl.constexpr, S: tl.constexpr, G: tl.constexpr, NB: tl.constexpr,
                NG: tl.constexpr, R: tl.constexpr, SCATTER: tl.constexpr, BLOCK: tl.constexpr):
    """Group key slot * NG + kv_head * NB + block of every valid entry: count it in the program's copy of
    the counters (CNT[r, key] += 1, r = program % R) or, once CNT holds each copy's first position in
    its group, write the entry's id there."""
    _place_at(tl.program_id(0), SEL, CNT, ENT, n_ent, NK, Hq, S, G, NB, NG, R, SCATTER, BLOCK)


@triton.jit
def _place_at(pid, SEL, CNT, ENT, n_ent, NK, Hq: tl.constexpr, S: tl.constexpr, G: tl.constexpr, NB: tl.constexpr,
              NG: tl.constexpr, R: tl.constexpr, SCATTER: tl.constexpr, BLOCK: tl.constexpr):
    o = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n_ent
    b = tl.load(SEL + o, mask=m, other=-1)
    ok = m & (b >= 0)
    key = (o % S) * NG + ((o // S) % Hq) // G * NB + b         # NG = 0: by (kv head, block) only
    pos = tl.atomic_add(CNT + (pid % R) * NK + key, 1, mask=ok, sem="relaxed")
    if SCATTER:
        tl.store(ENT + pos, o.to(tl.int32), mask=ok)


@triton.jit
def _scan_part(CNT, PART, NK, BM: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    """Per span of BLOCK groups (one program each): its entries and its tiles of BM entries, into PART[2 * pid + 0/1]
    (the first pass of `_slot_scan`'s split form)."""
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    o_r = tl.arange(0, R)
    c = tl.sum(tl.load(CNT + o_r[:, None] * NK + g[None, :], mask=g[None, :] < NK, other=0).to(tl.int64), 0)
    tl.store(PART + 2 * tl.program_id(0), tl.sum(c, 0))
    tl.store(PART + 2 * tl.program_id(0) + 1, tl.sum((c + BM - 1) // BM, 0))


@triton.jit
def _slot_scan(CNT, GRP_OFF, TILE_CUM, BASE, NK, BM: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
               SPLIT: tl.constexpr):
    """GRP_OFF = exclusive prefix sum of the counts (summed over the R copies), CNT[r, g] := the first position
    of copy r's entries in group g (the scatter's cursors); TILE_CUM[g + 1] = tiles of BM entries in groups
    0..g, TILE_CUM[0] = 0. One program over all groups, or (SPLIT) one per span of BLOCK groups starting from
    BASE[2 * pid + 0/1], the entries and tiles before its span (`_scan_part`, then an exclusive cumsum)."""
    pid = tl.program_id(0)
    if SPLIT:
        c_e = tl.load(BASE + 2 * pid)
        c_t = tl.load(BASE + 2 * pid + 1)
        lo = pid * BLOCK
        hi = tl.minimum(lo + BLOCK, NK)
    else:
        c_e = tl.zeros([1], tl.int64).sum(0)
        c_t = tl.zeros([1], tl.int64).sum(0)
        lo = 0
        hi = NK
    o_r = tl.arange(0, R)
    for c0 in range(lo, hi, BLOCK):
        g = c0 + tl.arange(0, BLOCK)
        m = g < hi
        p = CNT + o_r[:, None] * NK + g[None, :]
        c2 = tl.load(p, mask=m[None, :], other=0).to(tl.int64)          # [R, BLOCK]
        c = tl.sum(c2, 0)
        n_t = (c + BM - 1) // BM
        start = c_e + tl.cumsum(c, 0) - c
        tl.store(p, (start[None, :] + tl.cumsum(c2, 0) - c2).to(tl.int32), mask=m[None, :])
        tl.store(GRP_OFF + g, start, mask=m)
        tl.store(TILE_CUM + 1 + g, c_t + tl.cumsum(n_t, 0), mask=m)
        c_e += tl.sum(c, 0)
        c_t += tl.sum(n_t, 0)
    if pid == tl.num_programs(0) - 1:
        tl.store(GRP_OFF + NK, c_e)
        tl.store(TILE_CUM, c_t * 0)


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
    """``gate.block_means`` in one launch: fp32 [n_blocks, Hkv, D] (the torch version's summation passes
    hold an fp32 copy of up to 2^25 key elements: 64 MiB, as much as the whole output at 8K tokens)."""
    Tk, Hkv, D = k.shape
    out = torch.empty(lay.n_blocks, Hkv, D, dtype=torch.float32, device=k.device)
    if lay.n_blocks:
        # 32 columns per program: at 8K (16 blocks x 8 kv heads) one program per (block, head) was 128 programs each
        # reading 512 rows in turn, 0.032 ms on an H100 (PERFLOG 41)
        BD = min(32, max(16, next_pow2(D)))
        _block_means[(lay.n_blocks, Hkv, cdiv(D, BD))](
            k, out, lt.blk_start, lt.blk_end, k.stride(0), k.stride(1), out.stride(0), out.stride(1), D=D, BN=128,
            BD=BD, num_warps=4)
    return out


def select_past_blocks(q, k, lay: Layout, lt: LayoutTensors, topk: int) -> torch.Tensor:
    """The Triton gate alone: int32 [T, Hq, topk - 1] global block ids (as ``gate.select_past_blocks``)."""
    T, Hq, D = q.shape
    S = topk - 1
    sel = torch.full((T, Hq, S), -1, dtype=torch.int32, device=q.device)
    if S and lay.n_blocks > 1 and T:
        meta, launch = _cfg(D, D, q.dtype, "gate")
        tiles, _ = _q_tiles(lay, meta["BM"], device=q.device)
        _launch_gate(q, k, lay, lt, S, sel, 0, tiles, meta, launch)
    return sel


def _launch_gate(q, k, lay, lt, S, sel_c, t0, tiles, meta, launch, means=None, count=None):
    """``count``: `_counters`' (cnt, NK, R), counted by the gate as it writes the selection. With GATE_HEADS and
    sequences of at most 33 blocks, `_gate_topk_g` (one program per query tile and kv head)."""
    q0, q1, p0, kb, fb = tiles
    means = means if means is not None else block_means(k, lay, lt)
    Hq, Hkv = q.shape[1], k.shape[1]
    cnt, NK, R = count if count is not None else (sel_c, 1, 1)
    args = (q, means, sel_c, q0, q1, p0, kb, fb, q.stride(0), q.stride(1), means.stride(0), means.stride(1), t0,
            lay.block_size, cnt, NK, lay.n_blocks)
    kw = dict(Hq=Hq, G=Hq // Hkv, S=S, SP=next_pow2(S), D=q.shape[2], BM=meta["BM"], BNB=32,
              BD=meta["BD"], SPLIT=q.dtype != torch.float32, PREC=meta["PREC"], R=R, COUNT=count is not None)
    if GATE_HEADS == "1" and lay.most_blocks - 1 <= kw["BNB"] and S < GATE_REPLACE_S:
        _gate_topk_g[(q0.numel(), Hkv)](*args, **kw, **launch)
    else:
        _gate_topk[(q0.numel(), Hq)](*args, **kw, REPLACE=S >= GATE_REPLACE_S, **launch)


def _chunk_rows(T: int, Hq: int, Hkv: int, S: int, NB: int, bm: int, q_bytes: int, keep: bool) -> int:
    """Query rows per chunk of the forward (a multiple of 128, or T)."""
    # a chunk's own memory per row: its entry ids (int32), and its selection unless that is kept whole anyway (keep);
    # bounded by q's size / 16 (inference) or / 2 (KEEP_SHARE: a gradient to come, whose backward allocates more: dQ,
    # dK, dV and its own grouping of every row): training shapes with many slots and few heads ran in many chunks of
    # S launches each and were host-bound (26.75M model at 8K, 128/12: 6 chunks, 132 launches, PERFLOG 62)
    per_row = Hq * max(S, 1) * (4 if keep else 8)
    budget = max(SELECT_BYTES, q_bytes // (KEEP_SHARE if keep else SELECT_SHARE))
    # ... but enough rows that a (slot, kv head, block) group gets half a tile of them on average: with small
    # blocks and few heads, short chunks leave every tile nearly empty and multiply the launches (PERFLOG 36)
    fill = min(Hkv * NB * bm // (2 * Hq), FILL_BYTES // per_row)
    return min(T, max(128, (budget // per_row) // 128 * 128, -(-fill // 128) * 128),
               (2**31 - 1) // (Hq * max(S, 1)) // 128 * 128)


def _fwd(q, k, v, lay: Layout, lt: LayoutTensors, topk: int, scale: float, keep: bool = True, means=None,
         sel_dtype=torch.int32):
    """Own block first (``_own_fwd``, or its Gluon twin with GLUON_OWN, writes every row's first result), then per
    query chunk the gate, the grouping by (slot, kv head, block) and one ``_sparse_fwd`` launch (or its Gluon
    twin's) per slot that merges the chosen blocks into the output in place: no partial-output buffer. Chunks bound
    the selection and the entry list (``SELECT_BYTES``, or q's size / ``SELECT_SHARE``; / ``KEEP_SHARE`` when the
    selection is kept for a backward). The selection is kept (``keep``) as ``sel_dtype``: int16 halves it where the block ids fit
    (``utils.sel_dtype``)."""
    T, Hq, D = q.shape
    Hkv, DV = k.shape[1], v.shape[2]
    # no row has more than (its sequence's blocks - 1) earlier blocks: fewer slots, same selection
    most = lay.most_blocks
    G, S, NB = Hq // Hkv, max(0, min(topk - 1, most - 1)), lay.n_blocks
    meta, launch = _cfg(D, DV, q.dtype, "fwd")
    meta_g, launch_g = _cfg(D, DV, q.dtype, "gate")
    meta_o, launch_o = _cfg(D, DV, q.dtype, "own")
    out = new_empty(T, Hq, DV, dtype=q.dtype, device=q.device)
    lse = new_empty(T, Hq, dtype=torch.float32, device=q.device)
    sl2 = scale * LOG2E
    sparse = S > 0 and NB > 1
    ws = None    # the Gluon forward's K/V descriptors, where it runs (FWD_GLUON)
    wanted = FWD_GLUON == "all" or FWD_GLUON == "ws" and lay.block_size >= 128
    own_ws = GLUON_OWN == "1" and T > 0
    if (sparse or own_ws) and wanted and _gluon_usable(q, D, DV, 128, k, v, out):
        from . import gluon_fwd_ws
        ws = gluon_fwd_ws.descriptors(k, v, 128) if gluon_fwd_ws.usable(k, v) else None
        # its persistent form (at most one program per SM) or one program per tile (which takes the ablations)
        persist = GLUON_WS_PERSIST == "1" and not WS_ABLATE
        ws_kernel = gluon_fwd_ws.sparse_fwd_ws_persistent_kernel if persist else gluon_fwd_ws.sparse_fwd_ws_kernel
        pf = _ws_pf(D)
        sst = pf and GLUON_WS_SST == "1"
        qe = sst and GLUON_WS_QE == "1"
        ws_opts = (dict(PF=pf, TIME=pf and WS_TIME is not None, SST=sst, QE=qe) if persist else dict(ABL=WS_ABLATE))
    bm = 128 if ws else meta["BM"]
    chunk = _chunk_rows(T, Hq, Hkv, S, NB, bm, q.numel() * q.element_size(), keep)
    # the selection is kept for backward only when a gradient is needed (keep); else one chunk's worth
    shape = (T if keep else chunk, Hq, max(S, 1))
    run_sparse = sparse and T > 0
    own_qe = GLUON_OWN_SST == "1" and GLUON_OWN_QE == "1" and _ws_fits(D, 4)      # Q twice per consumer
    # the gate inside the own-block kernel (GLUON_OWN_GATE): one query chunk, sequences of at most 33 blocks, at most
    # 8 slots (its top-k rounds are unrolled; ptxas spills a few registers from 8)
    own_gate = (GLUON_OWN_GATE == "1" and bool(ws) and own_ws and own_qe and run_sparse and chunk >= T
                and most - 1 <= 32 and S <= 8)
    if run_sparse:
        # the gate writes every (row, head, slot) of each chunk (-1 where no block is chosen): no fill (under
        # MOBA_POISON, block 0 everywhere first, so that an entry it missed would give wrong results)
        sel = torch.zeros(shape, dtype=sel_dtype, device=q.device) if poisoned() else torch.empty(
            shape, dtype=sel_dtype, device=q.device)
        if means is None:   # fp32 block means: once per call, not per query chunk
            means = block_means(k, lay, lt)
    count0 = _counters(S, Hkv, NB, q.device) if own_gate and GATE_COUNT == "1" else None
    if ws and own_ws:
        tq = _own_tiles(lay, q.device)
        n = tq[0].numel() * Hq
        gate = ((means, sel, count0[0] if count0 else lse, means.stride(0), means.stride(1), S * Hkv * NB, NB)
                if own_gate else (lse, lse, lse, 0, 0, 1, 1))
        gluon_fwd_ws.own_fwd_ws_persistent_kernel[(min(n, sm_count(q.device)),)](
            q, *ws, out, lse, *tq, n, lay.block_size, q.stride(0), q.stride(1), out.stride(0), out.stride(1), sl2,
            *gate, Hq=Hq, G=G, D=D, BN=128, NS=GLUON_WS_NS, SST=GLUON_OWN_SST == "1", QE=own_qe, GATE=own_gate,
            S=S if own_gate else 1, NBC=16 if most - 1 <= 16 else 32, R=count0[2] if count0 else 1,
            COUNT=count0 is not None, num_warps=4)
    else:
        (q0, q1, p0, kb, _), _ = _q_tiles(lay, meta_o["BM"], device=q.device)
        if q0.numel():
            _own_fwd[(q0.numel(), Hq)](
                q, k, v, out, lse, q0, q1, p0, kb,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                out.stride(0), out.stride(1), sl2, lay.block_size, Hq=Hq, G=G, D=D, DV=DV, **meta_o, **launch_o)
    if not run_sparse:
        return out, lse, torch.full(shape, -1, dtype=sel_dtype, device=q.device)
    g_tiles, g_starts = _q_tiles(lay, meta_g["BM"], range(0, T, chunk), q.device)
    NG = Hkv * NB
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        sel_c = sel[t0:t1] if keep else sel[:t1 - t0]
        if own_gate:    # the own-block kernel chose (and counted) the blocks of the one chunk
            count = count0
        else:
            i0, i1 = _tile_range(g_starts, t0, t1)
            count = _counters(S, Hkv, NB, q.device) if GATE_COUNT == "1" else None
            _launch_gate(q, k, lay, lt, S, sel_c, t0, [x[i0:i1] for x in g_tiles], meta_g, launch_g, means, count)
        ent, grp_off, tile_g, tile_e0, tile_cum, *tinfo = _group(
            sel_c, Hkv, NB, bm, by_slot=True, blocks=(lt.blk_start, lt.blk_end) if ws and persist and qe else None,
            cnt=count[0] if count else None)
        grid = (cdiv((t1 - t0) * Hq, bm) + NG,)      # >= the tiles of one slot
        tables = (ent, tile_g, tile_e0, tile_cum, grp_off[1:], lt.blk_start, lt.blk_end)
        for s in range(S):
            if ws:
                ws_kernel[(min(grid[0], sm_count(q.device)),) if persist else grid](
                    q, *ws, out, lse, *tables, q.stride(0), q.stride(1), out.stride(0), out.stride(1), t0, sl2, NB,
                    NG, s, *((WS_TIME[s] if WS_TIME is not None else lse, tinfo[0] if tinfo else tile_g) if persist
                             else ()), Hq=Hq, S=S, D=D,
                    BN=128, NS=GLUON_WS_NS, EVEN=lay.block_size % 128 == 0, num_warps=4, **ws_opts)
            else:
                _sparse_fwd[grid](
                    q, k, v, out, lse, *tables, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                    v.stride(1), out.stride(0), out.stride(1), t0, sl2, NB, NG, s, Hq=Hq, S=S, D=D, DV=DV,
                    EVEN=lay.block_size % meta["BN"] == 0, **meta, **launch)
    return out, lse, sel


def _ws_fits(D: int, tiles: int) -> bool:
    """The Gluon forward's K/V ring and ``tiles`` [64, D] row tiles (16-bit) within the 227 KB of shared memory an
    sm_90 program may have."""
    return (GLUON_WS_NS * 128 * D * 2 + tiles * 64 * D) * 2 <= 229376


def _ws_pf(D: int) -> bool:
    """GLUON_WS_PF where it fits: six row tiles (Q twice and O once per consumer)."""
    return GLUON_WS_PF == "1" and _ws_fits(D, 6)


def _gluon_usable(q, D, DV, BN, *tensors):
    from .gluon_dkdv import usable
    return usable(q, D, DV, BN, *tensors)


def _bwd(q, k, v, out, lse, do, dlse, sel, lay: Layout, lt: LayoutTensors, topk: int, scale: float,
         deterministic: bool):
    T, Hq, D = q.shape
    Tk, Hkv, DV = v.shape
    G, S, NB = Hq // Hkv, sel.shape[2], lay.n_blocks
    meta, launch = _cfg(D, DV, q.dtype, "dq")
    meta_k, launch_k = _cfg(D, DV, q.dtype, "dkdv")
    meta_o, launch_o = _cfg(D, DV, q.dtype, "own_dq")
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = torch.empty(T, Hq, dtype=torch.float32, device=q.device)
    if T:
        dl = dlse.contiguous() if dlse is not None else delta
        _delta[(cdiv(T * Hq, 64),)](out, do, dl, delta, T * Hq, out.stride(0), out.stride(1), do.stride(0),
                                           do.stride(1), Hq=Hq, DV=DV, BR=64, BDV=meta["BDV"],
                                           HAS_DLSE=dlse is not None)
    dk = new_empty(Tk, Hkv, D, dtype=k.dtype, device=q.device)
    dv = new_empty(Tk, Hkv, DV, dtype=v.dtype, device=q.device)
    sl2 = scale * LOG2E
    has_sparse = NB > 1 and topk > 1
    Sx = S if has_sparse else 0
    # deterministic (dK/dV sum each group's rows in one order) or past int32 entry ids: a stable sort
    stable = deterministic or sel.numel() >= 2**31
    ent, grp_off, tile_g, tile_e0 = (_group(sel, Hkv, NB, meta["BM"], False, stable)[:4] if has_sparse else
                                     (torch.zeros(1, dtype=torch.int64, device=q.device),
                                      torch.zeros(Hkv * NB + 1, dtype=torch.int64, device=q.device), None, None))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               do.stride(0), do.stride(1))
    # dK, dV: one program per key tile of a block (the table comes from the host-side layout: no sync)
    BN = meta_k["BN"]
    kt_b, kt_n0 = cached(("k_tiles", lay.key(), BN, str(q.device)), lambda: _k_tiles(lay, BN, q.device))
    n_kt = kt_b.numel()
    blocks = torch.arange(NB, device=q.device)
    own_q0 = torch.searchsorted(lt.own_block, blocks)                # own_block is sorted
    own_q1 = torch.searchsorted(lt.own_block, blocks, right=True)
    gluon = DKDV_GLUON in ("1", "all")
    args = (q, k, v, do, lse, delta, dk, dv, ent, grp_off, kt_b, kt_n0, lt.blk_start, lt.blk_end, own_q0, own_q1,
            lt.q_pos, *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), scale, sl2, NB)
    if n_kt and gluon and _gluon_usable(q, D, DV, BN, k, v, do):
        from .gluon_dkdv import dkdv_kernel
        dkdv_kernel[(n_kt * Hkv,)](*args, Hq=Hq, Hkv=Hkv, G=G, S=max(S, 1), D=D, BM=32, BN=BN, NS=GLUON_NS,
                                   num_warps=8)
    elif n_kt:
        _dkdv[(n_kt * Hkv,)](*args, Hq=Hq, Hkv=Hkv, G=G, S=max(S, 1), D=D, DV=DV, **meta_k, **launch_k)
    # dQ: chosen blocks (gathered tiles), then own block + sum
    dq_acc = dqp = None
    if has_sparse:
        if deterministic:
            dqp = torch.empty(T * Hq * S, D, dtype=torch.float32, device=q.device)
        else:
            dq_acc = torch.zeros(T * Hq, D, dtype=torch.float32, device=q.device)
        _sparse_dq[(tile_g.numel(),)](q, k, v, do, lse, delta, dq_acc if dqp is None else dqp, ent, tile_g,
                                      tile_e0, grp_off[1:], lt.blk_start, lt.blk_end, *strides, scale, sl2, NB,
                                      Hq=Hq, S=S, D=D, DV=DV, ATOMIC=dqp is None,
                                      EVEN=lay.block_size % meta["BN"] == 0, **meta, **launch)
    # the entry ids are dead now: dQ's output takes their place (peak: entry ids + dQ's fp32 sum, not both + dQ)
    del ent, grp_off, tile_g, tile_e0, args
    dq = new_empty(T, Hq, D, dtype=q.dtype, device=q.device)
    (q0, q1, p0, kb, _), _ = _q_tiles(lay, meta_o["BM"], device=q.device)
    if q0.numel():
        dummy = torch.zeros(1, dtype=torch.float32, device=q.device)
        _own_dq[(q0.numel(), Hq)](q, k, v, do, lse, delta, dummy if dq_acc is None else dq_acc,
                                  dummy if dqp is None else dqp, sel, dq, q0, q1, p0, kb, *strides,
                                  dq.stride(0), dq.stride(1), scale, sl2, lay.block_size,
                                  Hq=Hq, G=G, S=Sx, D=D, DV=DV, ATOMIC=dq_acc is not None, **meta_o, **launch_o)
    return dq, dk, dv
