"""Device helpers shared by the Triton kernels (gate, forward, backward, decode) and the host-side tile tables
they read: query tiles of one sequence, key tiles of one block, gathered (row, slot) entries, the online softmax.
"""
from __future__ import annotations

import bisect

import torch
import triton
import triton.language as tl

from ..layout import Layout
from ..utils import cached, next_pow2, to_device
from .configs import CONFIG, GPU_DEFAULT

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 128


def supports(q: torch.Tensor, v: torch.Tensor | None = None) -> bool:
    """Inputs the kernels take: 16/32-bit floats, head dims up to 128 (larger ones go to "torch")."""
    dv = q.shape[-1] if v is None else v.shape[-1]
    return q.dtype in (torch.float16, torch.bfloat16, torch.float32) and max(q.shape[-1], dv) <= MAX_HEAD_DIM


@triton.jit
def query_tile(i_t, TILE_Q0, TILE_Q1, TILE_P0, TILE_KB, block_size, BM: tl.constexpr):
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
def gathered_rows(ENT, e0, e1, S: tl.constexpr, Hq: tl.constexpr, BM: tl.constexpr):
    """Up to BM gathered (row, slot) entries e0..e1-1: their ids, mask, flat row (t * Hq + h), t and h."""
    o_e = e0 + tl.arange(0, BM)
    m_e = o_e < e1
    f = tl.load(ENT + o_e, mask=m_e, other=0).to(tl.int64)   # int64: t * stride passes 2^31 at 1M tokens
    row = f // S
    return f, m_e, row, row // Hq, row % Hq


@triton.jit
def online_softmax(b_s, p_v, m_v, b_m, b_l, b_acc, PREC: tl.constexpr, SAFE: tl.constexpr):
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


def kernel_config(D: int, DV: int, dtype, kind: str = "fwd"):
    BD, BDV = max(16, next_pow2(D)), max(16, next_pow2(DV))
    BM, BN, warps, stages = CONFIG[kind] if CONFIG[kind] is not None else GPU_DEFAULT[kind]
    return (dict(BM=BM, BN=BN, BD=BD, BDV=BDV, PREC="ieee" if dtype == torch.float32 else "tf32"),
            dict(num_warps=warps, num_stages=stages))


def q_tiles(lay: Layout, BM: int, cuts=(), device="cpu"):
    cuts = tuple(cuts)
    return cached(("q_tiles", lay.key(), BM, cuts, str(device)), lambda: make_q_tiles(lay, BM, cuts, device))


def make_q_tiles(lay: Layout, BM: int, cuts=(), device="cpu"):
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


def k_tiles(lay: Layout, BN: int, device):
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


def tile_range(starts: list, t0: int, t1: int):
    return bisect.bisect_left(starts, t0), bisect.bisect_left(starts, t1)


def sm90_signature(fn, cexpr: dict, ptrs: dict, ints, floats=("scale", "scale_log2")):
    """(signature, constexprs, attributes) to compile the Triton or Gluon kernel ``fn`` ahead of time
    (`triton.compile` for sm_90, no GPU): ``cexpr`` its constexpr values, ``ptrs`` element types of its
    pointers by name (any other argument not in ``ints``/``floats`` is an int64 table), ``ints`` its int32
    arguments; pointers and ints are declared 16-divisible as at a launch with aligned tensors. A constexpr that
    ``cexpr`` leaves out takes its default, as at a launch."""
    sig, attrs = {}, {}
    cexpr = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **cexpr}
    for i, n in enumerate(fn.arg_names):
        if n in cexpr:
            sig[n] = "constexpr"
        elif n in floats:
            sig[n] = "fp32"
        else:
            sig[n] = "i32" if n in ints else "*" + ptrs.get(n, "i64")
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, {(fn.arg_names.index(n),): v for n, v in cexpr.items()}, attrs
