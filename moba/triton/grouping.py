"""The selection inverted: the chosen (row, slot) entries grouped on the device by (slot, kv head, block), or
by (kv head, block), with a counting sort and no host synchronisation, so that every key block sees the list of
query rows that chose it. The forward and the backward's gathered tiles read these tables.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import cdiv
from .configs import PLACE_COPIES, SCAN_SPANS
from .launch import launch_kernel


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


def counters(S: int, Hkv: int, NB: int, device) -> tuple:
    """Zeroed counters for the forward's grouping by (slot, kv head, block), to be counted by the gate
    : (cnt, NK, R)."""
    NK = S * Hkv * NB
    return torch.zeros(_copies(NK) * NK, dtype=torch.int32, device=device), NK, _copies(NK)


def group_entries(sel: torch.Tensor, Hkv: int, NB: int, BM: int, by_slot: bool, stable: bool = False, blocks=None,
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
    counted (`counters`, by the gate), so the counting pass is skipped.
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
        # writes no ids
        launch_kernel(_slot_place, grid, sel, cnt, cnt if stable else ent, n_ent, NK, SCATTER=False, **kw)
    blk = 2048 // R
    n_span = cdiv(NK, blk)
    if n_span > SCAN_SPANS:     # many groups (small blocks, many slots): the scan in parallel spans
        part = torch.empty(n_span, 2, dtype=torch.int64, device=dev)
        launch_kernel(_scan_part, (n_span,), cnt, part, NK, BM=BM, R=R, BLOCK=blk)
        base = part.cumsum(0) - part
        launch_kernel(_slot_scan, (n_span,), cnt, grp_off, tile_cum, base, NK, BM=BM, R=R, BLOCK=blk, SPLIT=True)
    else:
        launch_kernel(_slot_scan, (1,), cnt, grp_off, tile_cum, cnt, NK, BM=BM, R=R, BLOCK=blk, SPLIT=False)
    if stable:
        key = torch.empty(n_ent, dtype=torch.int32, device=dev)
        if n_ent:
            launch_kernel(_group_keys, grid, sel, key, n_ent, Hq=Hq, S=S, G=G, NB=NB, NG=NG, BLOCK=1024)
        ent = torch.sort(key, stable=True).indices
    tinfo = torch.empty(n_max, 4, dtype=torch.int32, device=dev) if blocks is not None else tile_g
    tables = (grp_off, tile_cum[1:], tile_g, tile_e0)
    info = dict(BM=BM, BLOCK=1024, ROUNDS=NK.bit_length(), INFO=blocks is not None)
    blks = blocks if blocks is not None else (tile_g, tile_g)
    n_ti = cdiv(n_max, 1024)
    if stable or not n_ent:
        launch_kernel(_tile_index, (n_ti,), *tables, NK, n_max, tinfo, *blks, NB, **info)
    else:   # the scatter and the tile table in one launch
        launch_kernel(_scatter_index, (grid[0] + n_ti,), sel, cnt, ent, n_ent, NK, grid[0], *tables, n_max, tinfo,
                      *blks, NB, **kw, **{k: v for k, v in info.items() if k != "BLOCK"})
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
