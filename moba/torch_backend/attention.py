"""The "torch" backend: MoBA in plain PyTorch, grouped by key block, memory-lean (forward and backward;
autograd is wired in ``moba/autograd.py``). The CPU path, and the portable one on any device.

Shape of the computation (no Tq x Tk tensor, no fp32 blocks x heads x tokens tensor):
1. the gate (``torch_backend/gate.py``) picks ``topk - 1`` earlier blocks per (query, head) -> int32 [T, Hq, topk-1];
2. own blocks: the queries whose own block is ``b`` are a contiguous run of rows, so each block is one
   small dense causal attention over all heads at once;
3. chosen blocks: the (query, head) rows that chose block ``b`` of kv head ``g`` are gathered (a stable
   sort of the selection) and attend that block's keys in one dense matmul;
4. partial results merge into a running (max, sum, acc) per row, as in FlashAttention's online softmax.
Backward recomputes the same tiles from the saved log-sum-exp (FlashAttention-2 style), no atomics.
Working tiles are bounded by ``TILE`` elements whatever the sequence length.

On the CPU the forward hands both kinds of tile to PyTorch's fused attention kernel where it can (the one SDPA
uses on the CPU, which also returns the log-sum-exp): a run of own blocks whose queries are all of their
positions (causal squares) is one call per kv head, its K/V a stride-0 view for the group's query heads (no
copy, whatever the kernel's own support for grouped heads); each chosen (kv head, block) group is one unmasked
call. Inputs go in as they are, the kernel applying the scale; fp16/bf16 ones are computed in fp32 inside the kernel
and each tile's output is rounded once to that dtype before the fp32 merge (about 1.5x the error of one attention
computed at that dtype). No scaled copy of q is made: matmul tiles upcast and scale their own rows, and
q may have any strides. Elsewhere
(other devices, V's head dim unlike Q's, a PyTorch without that kernel or whose kernel fails a first-use probe, or
``CPU_FUSED = False``) the same tiles are computed with matmuls as above. The backward does the same with PyTorch's
fused CPU attention backward (see ``backward``), the chosen groups cut into pieces and batched.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from ..layout import Layout, LayoutTensors
from ..utils import new_empty

TILE = 1 << 23  # elements of one score tile (fp32: 32 MB)
# the CPU tiles through PyTorch's fused attention kernels (see the module's docstring); tests set it False to run the
# matmul tiles on the CPU
CPU_FUSED = True
BWD_TILE = 1 << 21  # the backward's tiles: a matmul group's scores (it holds three: p, dp, ds); the fused kernel's
#                    batches of pieces and runs of causal squares (it returns dQ, dK, dV for each)
FUSED_MIN_ROWS = 64  # a chosen group of fewer rows (a decode step's) costs less as two small matmuls


def _fused_cpu(q, v):
    """PyTorch's fused CPU attention (query, key, value [B, H, L, D]; dropout_p, is_causal, *, attn_mask, scale ->
    output, log-sum-exp), or None where it does not apply."""
    if not CPU_FUSED or q.device.type != "cpu" or q.shape[-1] != v.shape[-1]:
        return None
    return _fused_cpu_op()


@functools.cache
def _fused_cpu_op():
    """The kernel if this PyTorch has it and it passes ``_probe`` (it is an internal op of PyTorch's, used as SDPA
    uses it: a missing or changed one means the matmul tiles, with a warning, never a wrong result)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and not _probe(op):
        warnings.warn("moba: PyTorch's fused CPU attention kernel did not match its definition on a probe; the CPU "
                      "forward computes its tiles with matmuls instead", RuntimeWarning, stacklevel=3)
        return None
    return op


def _probe(op) -> bool:
    """``op`` computes attention and its log-sum-exp as used here: causal and not, a kv head as a stride-0 view,
    a scale, fp64, bf16 and fp16."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = (x[:, :1].expand(-1, 3, -1, -1) for x in (k, v))
    s = q @ k.transpose(-1, -2) * 0.5
    try:
        for causal, dtype, tol in ((True, torch.float64, 1e-8), (False, torch.float64, 1e-8), (True, torch.float32, 1e-5),
                                   (True, torch.bfloat16, 3e-2), (False, torch.float16, 1e-2)):
            sc = s.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf")) if causal else s
            o, lse = op(q.to(dtype), k.to(dtype), v.to(dtype), 0.0, causal, scale=0.5)
            if not (torch.allclose(o.double(), sc.softmax(-1) @ v, atol=tol, rtol=tol)
                    and torch.allclose(lse.double(), sc.logsumexp(-1), atol=tol, rtol=tol)):
                return False
        return True
    except Exception:           # any failure of an internal op's call is a "no"
        return False


def _fused_cpu_bwd(q, v):
    """PyTorch's fused CPU attention backward (grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *,
    attn_mask, scale -> grad_query, grad_key, grad_value), or None where it does not apply (as ``_fused_cpu``)."""
    if _fused_cpu(q, v) is None:
        return None
    return _fused_cpu_bwd_op()


@functools.cache
def _fused_cpu_bwd_op():
    """The kernel if this PyTorch has it and it passes ``_probe_bwd``, else None (the matmul tiles, with a warning)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if op is not None and not _probe_bwd(_fused_cpu_op(), op):
        warnings.warn("moba: PyTorch's fused CPU attention backward did not match its definition on a probe; the CPU "
                      "backward computes its tiles with matmuls instead", RuntimeWarning, stacklevel=3)
        return None
    return op


def _probe_bwd(fwd, op) -> bool:
    """``op`` gives attention's gradients as used here: causal and not, a kv head as a stride-0 view (its gradient
    per query head), a scale, fp64, fp32, bf16 and fp16; and with the out / log-sum-exp of attention over *more* keys
    than it is given (a tile of them), that tile's share of the gradients: the shares of two tiles add up."""
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 3, 6, 8, generator=g, dtype=torch.float64) for _ in range(4))
    try:
        for causal, dtype, tol in ((True, torch.float64, 1e-8), (False, torch.float64, 1e-8),
                                   (True, torch.float32, 1e-4), (False, torch.bfloat16, 1e-1),
                                   (True, torch.float16, 2e-2)):
            # the reference gradients written out (no autograd: the first use comes inside a custom op's backward)
            kk, vv = k[:, :1], v[:, :1]
            s = (q @ kk.transpose(-1, -2)) * 0.5
            if causal:
                s = s.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
            p = s.softmax(-1)
            ds = p * (do @ vv.transpose(-1, -2) - (do * (p @ vv)).sum(-1, keepdim=True)) * 0.5
            wants = (ds @ kk, (ds.transpose(-1, -2) @ q).sum(1, keepdim=True),
                     (p.transpose(-1, -2) @ do).sum(1, keepdim=True))
            x = [t.to(dtype) for t in (q, kk.expand(-1, 3, -1, -1), vv.expand(-1, 3, -1, -1), do)]
            o, lse = fwd(*x[:3], 0.0, causal, scale=0.5)
            gq, gk, gv = op(x[3], *x[:3], o, lse, 0.0, causal, scale=0.5)
            for got, want in zip((gq, gk.sum(1, keepdim=True), gv.sum(1, keepdim=True)), wants):
                if not torch.allclose(got.double(), want, atol=tol, rtol=tol):
                    return False
        o, lse = fwd(q, k, v, 0.0, False, scale=0.5)
        whole = op(do, q, k, v, o, lse, 0.0, False, scale=0.5)
        a, b = (op(do, q, k[:, :, t], v[:, :, t], o, lse, 0.0, False, scale=0.5) for t in (slice(0, 2), slice(2, 6)))
        return (torch.allclose(a[0] + b[0], whole[0], atol=1e-10)
                and all(torch.allclose(torch.cat([a[i], b[i]], 2), whole[i], atol=1e-10) for i in (1, 2)))
    except Exception:           # any failure of an internal op's call is a "no"
        return False


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Plan:
    """Which rows attend which key ranges; built once per call and reused by backward."""

    own: list            # (q_start, q_end, k_start, k_end) per block that is someone's own block
    groups: list         # (kv_head, k_start, k_end, entry_offset, n_rows) per chosen (head, block)
    rows: torch.Tensor   # [n_entries] flat row ids (t * Hq + h) sorted by (kv head, block)
    q_pos: torch.Tensor  # [total_q] key row of each query's own position


def make_plan(sel: torch.Tensor, lay: Layout, lt: LayoutTensors, Hkv: int) -> Plan:
    T, Hq, S = sel.shape
    G = Hq // Hkv
    NB = lay.n_blocks
    starts, ends = lt.blk_start.tolist(), lt.blk_end.tolist()
    cnt = torch.bincount(lt.own_block, minlength=NB).tolist() if T else [0] * NB
    own, q0 = [], 0
    for b, c in enumerate(cnt):
        if c:
            own.append((q0, q0 + c, starts[b], ends[b]))
            q0 += c
    groups = []
    rows = torch.empty(0, dtype=torch.int64, device=sel.device)
    if S and T:
        flat = sel.reshape(-1).long()
        ent = torch.nonzero(flat >= 0).squeeze(1)                     # [n] flat (t*Hq + h)*S + s
        head = (ent // S) % Hq
        key = (head // G) * NB + flat[ent]
        order = torch.argsort(key, stable=True)
        rows = (ent // S)[order]
        counts = torch.bincount(key, minlength=Hkv * NB).tolist()
        off = 0
        for gid, c in enumerate(counts):
            if c:
                g, b = divmod(gid, NB)
                groups.append((g, starts[b], ends[b], off, c))
                off += c
    return Plan(own=own, groups=groups, rows=rows, q_pos=lt.q_pos)


def _chunks(n: int, per_row: int, tile: int = TILE):
    step = max(1, tile // max(1, per_row))
    for i in range(0, n, step):
        yield i, min(n, i + step)


OWN_ROWS = 128  # queries per own-block tile: a tile reads keys only up to its last query


def _own_tiles(plan: Plan, Hq: int, own=None):
    """(q_start, a, b, k_start, k_end): queries q_start+a..q_start+b-1 against keys k_start..k_end-1; of the own
    blocks ``own`` (default: all of the plan's)."""
    pos = None
    for qs, qe, ks, ke in plan.own if own is None else own:
        if pos is None:
            pos = plan.q_pos.tolist()
        for a, b in _chunks(qe - qs, Hq * (ke - ks)):
            for a2 in range(a, b, OWN_ROWS):
                b2 = min(b, a2 + OWN_ROWS)
                yield qs, a2, b2, ks, min(ke, pos[qs + b2 - 1] + 1)


def _square_runs(plan: Plan, Hq: int, D: int, tile: int | None = None):
    """Own blocks whose queries are exactly the block's key positions (a causal square), as runs of consecutive
    blocks of one length: (q_start, k_start, n_blocks, length), each run at most ``tile`` elements of Q; and the
    other own blocks, for the tiles."""
    runs, rest, pos = [], [], plan.q_pos.tolist() if plan.own else []
    tile = TILE if tile is None else tile
    for qs, qe, ks, ke in plan.own:
        n = qe - qs
        if n != ke - ks or pos[qs] != ks:
            rest.append((qs, qe, ks, ke))
        elif runs and runs[-1][3] == n and runs[-1][0] + runs[-1][2] * n == qs \
                and runs[-1][1] + runs[-1][2] * n == ks and (runs[-1][2] + 1) * n * Hq * D <= tile:
            runs[-1][2] += 1
        else:
            runs.append([qs, ks, 1, n])
    return runs, rest


def _by_block(x, start: int, nb: int, n: int):
    """Rows start .. start + nb * n of a packed [T, H, ...] tensor as [nb, H, n, ...] views (a run of blocks)."""
    return x[start:start + nb * n].unflatten(0, (nb, n)).transpose(1, 2)


def forward(q, k, v, plan: Plan, scale: float):
    """q [T, Hq, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv] packed -> out [T, Hq, Dv] (acc dtype), lse [T, Hq]."""
    T, Hq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    G = Hq // Hkv
    acc = _acc(q.dtype)
    M = new_empty(T * Hq, dtype=acc, device=q.device)
    L = new_empty(T * Hq, dtype=acc, device=q.device)
    O = new_empty(T * Hq, Dv, dtype=acc, device=q.device)
    fused = _fused_cpu(q, v)
    runs, rest = _square_runs(plan, Hq, D) if fused else ([], None)
    # the fused kernel reads the inputs as they are (fp16/bf16 too: fp32 inside, each tile's output rounded once to
    # that dtype before the fp32 merge) and applies the scale; the matmul tiles upcast and scale their own rows
    # (no scaled copy of q: any strides, one tile at a time)
    kdt = q.dtype if fused else acc
    O3, M2 = O.view(T, Hq, Dv), M.view(T, Hq)
    for qs, ks, nb, n in runs:                      # causal squares: softmax output and log-sum-exp (sum 1)
        rows = slice(qs, qs + nb * n)
        qb = _by_block(q, qs, nb, n)                                          # [blocks, heads, n, D] views
        kb, vb = (_by_block(x, ks, nb, n).to(kdt) for x in (k, v))
        for g in range(Hkv):                        # the group's K/V head as a stride-0 view: no copy
            h = slice(g * G, (g + 1) * G)
            o, lse = fused(qb[:, h], kb[:, g:g + 1].expand(-1, G, -1, -1), vb[:, g:g + 1].expand(-1, G, -1, -1),
                           0.0, True, scale=scale)
            O3[rows, h] = o.transpose(1, 2).reshape(nb * n, G, Dv)
            M2[rows, h] = lse.transpose(1, 2).reshape(nb * n, G)
        L[rows.start * Hq:rows.stop * Hq] = 1
    # own blocks: dense causal attention of a run of queries over one block, all heads at once
    for qs, a, b, ks, ke in _own_tiles(plan, Hq, rest):
        kb = k[ks:ke].to(acc)                                               # [l, Hkv, D]
        vb = v[ks:ke].to(acc)
        s = torch.einsum("ngjd,lgd->ngjl", q[qs + a:qs + b].to(acc).view(b - a, Hkv, G, D), kb).mul_(scale)
        future = torch.arange(ks, ke, device=q.device)[None, :] > plan.q_pos[qs + a:qs + b, None]
        s.masked_fill_(future[:, None, None, :], float("-inf"))             # [n, Hkv, G, l]
        m = s.amax(-1, keepdim=True)
        p = torch.exp_(s.sub_(m))
        r = slice((qs + a) * Hq, (qs + b) * Hq)
        L[r] = p.sum(-1).reshape(-1)
        M[r] = m.reshape(-1)
        O[r] = torch.einsum("ngjl,lgd->ngjd", p, vb).reshape(-1, Dv)
    # chosen earlier blocks: gathered rows against one block of one kv head; never masked
    qf = q.reshape(T * Hq, D)    # rows gathered with index_select (several times faster than advanced indexing on
    #                              the CPU); a view unless (T, H) do not fold into one dim (then one copy, as backward)
    for g, ks, ke, off, n in plan.groups:
        kb = k[ks:ke, g].to(kdt)                                            # [l, D]
        vb = v[ks:ke, g].to(kdt)
        for a, b in _chunks(n, ke - ks):
            r = plan.rows[off + a:off + b]
            qr = qf.index_select(0, r)                                          # [n, D]
            if fused and b - a >= FUSED_MIN_ROWS:  # normalised output and log-sum-exp of the rows over this block
                o, m = (x[0, 0] for x in fused(qr[None, None], kb[None, None], vb[None, None], 0.0, False,
                                               scale=scale))
                p_sum = 1
            else:
                s = (qr.to(acc) @ kb.to(acc).T).mul_(scale)                     # [n, l]
                m = s.amax(-1)
                p = torch.exp_(s.sub_(m[:, None]))
                p_sum, o = p.sum(-1), p @ vb.to(acc)
            m0 = M.index_select(0, r)
            mn = torch.maximum(m0, m)
            a0, a1 = torch.exp(m0 - mn), torch.exp(m - mn)
            L.index_copy_(0, r, L.index_select(0, r).mul_(a0).add_(p_sum * a1))
            O.index_copy_(0, r, O.index_select(0, r).mul_(a0[:, None]).add_(o * a1[:, None]))   # half o promoted: no copy
            M.index_copy_(0, r, mn)
    lse = (M + torch.log(L)).view(T, Hq)
    return O.div_(L[:, None]).view(T, Hq, Dv), lse


PIECE_ROWS = (1024, 256)  # the fused backward's chosen groups: rows per piece (one batch entry of the kernel), large
#                           pieces first (the kernel's rate per pair: 1.5 ns at 1024 x 512, 2.4 at 256 x 512, bf16)


def _fused_pieces_bwd(fused, qf, k, v, outf, dof, lsef, dqf, dk, dv, plan: Plan, scale: float) -> list:
    """The chosen groups' gradients through the fused CPU backward, which spreads its work over batch x heads only:
    each group of ``FUSED_MIN_ROWS`` rows or more whose block is full (the longest, ``block_size`` keys) is cut into
    pieces of ``PIECE_ROWS`` rows, and the pieces of all such groups go to the kernel as one batch (in batches of about
    ``BWD_TILE`` score elements), each with its block's K/V rows (copied per piece). A last piece's missing rows repeat
    its last row with dout zeroed: they add nothing (zero dS, zero dV terms). dQ, dK and dV are scattered back with
    index_add_. Returns the groups left for the matmul tiles (fewer rows, or a sequence's shorter last block)."""
    Hkv, D, Dv = k.shape[1], k.shape[2], v.shape[2]
    left, pieces = [], {c: [] for c in PIECE_ROWS}      # pieces by rows: (first entry, rows, kv head, first key row)
    L = max(ke - ks for _, ks, ke, _, _ in plan.groups) if plan.groups else 0       # a full block's keys
    big, small = PIECE_ROWS[0], PIECE_ROWS[-1]
    for grp in plan.groups:
        g, ks, ke, off, n = grp
        if n < FUSED_MIN_ROWS or ke - ks != L:
            left.append(grp)
            continue
        a = 0
        while n - a > big - small:          # large pieces while they are at least 3/4 full
            pieces[big].append((off + a, min(big, n - a), g, ks))
            a += big
        pieces[small] += [(off + b, min(small, n - b), g, ks) for b in range(a, n, small)]
    kf, vf = k.reshape(-1, D), v.reshape(-1, Dv)              # rows t * Hkv + g (views of the packed inputs)
    dkf, dvf = dk.view(-1, D), dv.view(-1, Dv)
    for c, todo in pieces.items():
        if todo:
            _pieces_bwd(fused, c, L, Hkv, todo, qf, kf, vf, outf, dof, lsef, dqf, dkf, dvf, plan, scale)
    return left


def _pieces_bwd(fused, c, L, Hkv, pieces, qf, kf, vf, outf, dof, lsef, dqf, dkf, dvf, plan: Plan, scale: float):
    """``_fused_pieces_bwd``'s pieces of ``c`` rows against blocks of ``L`` keys (kv heads ``Hkv``), in batches."""
    D, Dv, acc, dev = qf.shape[1], vf.shape[1], dqf.dtype, qf.device
    per = max(1, BWD_TILE // (L * c))
    ar_c, ar_l = torch.arange(c, device=dev), torch.arange(L, device=dev)
    for i in range(0, len(pieces), per):
        e0, nr, g, ks = (torch.tensor(x, device=dev) for x in zip(*pieces[i:i + per]))
        P = e0.numel()
        ent = e0[:, None] + torch.minimum(ar_c[None, :], nr[:, None] - 1)              # [P, c] entries, padded
        r = plan.rows[ent.reshape(-1)]                                                 # [P * c] rows t * Hq + h
        kr = ((ks[:, None] + ar_l[None, :]) * Hkv + g[:, None]).reshape(-1)           # [P * L] key rows
        do = dof.index_select(0, r).view(P, 1, c, Dv)
        do.masked_fill_((ar_c[None, :] >= nr[:, None]).view(P, 1, c, 1), 0)
        gq, gk, gv = fused(do, qf.index_select(0, r).view(P, 1, c, D), kf.index_select(0, kr).view(P, 1, L, D),
                           vf.index_select(0, kr).view(P, 1, L, Dv), outf.index_select(0, r).view(P, 1, c, Dv),
                           lsef.index_select(0, r).view(P, 1, c), 0.0, False, scale=scale)
        dqf.index_add_(0, r, gq.reshape(-1, D).to(acc))
        dkf.index_add_(0, kr, gk.reshape(-1, D).to(acc))
        dvf.index_add_(0, kr, gv.reshape(-1, Dv).to(acc))


def backward(q, k, v, out, lse, dout, dlse, plan: Plan, scale: float):
    """Gradients by recomputation from the saved log-sum-exp; fp32 (fp64) accumulation.

    On the CPU (as the forward, and unless the log-sum-exp has a gradient of its own) the causal squares and the
    chosen groups of ``FUSED_MIN_ROWS`` rows or more go through PyTorch's fused CPU attention backward, given the
    rows' global output and log-sum-exp: the kernel then returns that tile's share of the gradients (its softmax
    is the global one restricted to the tile's keys; its delta, rowsum(dout * out), the global one). Its results
    come in the inputs' dtype, one rounding per tile for fp16/bf16 (a row of dQ sums its own block's and each
    chosen block's; a block's dK/dV, its own square's and each group's that chose it)."""
    T, Hq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    G = Hq // Hkv
    acc = _acc(q.dtype)
    fused = _fused_cpu_bwd(q, v) if dlse is None or not bool(dlse.any()) else None
    runs, rest = _square_runs(plan, Hq, D, BWD_TILE) if fused else ([], None)    # the kernel's gradients: 3x Q
    lse = lse.to(acc)
    dq = torch.zeros(T, Hq, D, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for qs, ks, nb, n in runs:                      # causal squares, one call per kv head (stride-0 K/V views)
        qb, dob, ob, lb, kb, vb = (_by_block(x, s0, nb, n) for x, s0 in ((q, qs), (dout, qs), (out, qs), (lse, qs),
                                                                         (k, ks), (v, ks)))
        for g in range(Hkv):
            h = slice(g * G, (g + 1) * G)
            gq, gk, gv = fused(dob[:, h], qb[:, h], kb[:, g:g + 1].expand(-1, G, -1, -1),
                               vb[:, g:g + 1].expand(-1, G, -1, -1), ob[:, h], lb[:, h], 0.0, True, scale=scale)
            _by_block(dq, qs, nb, n)[:, h] += gq
            _by_block(dk, ks, nb, n)[:, g].add_(gk.sum(1))
            _by_block(dv, ks, nb, n)[:, g].add_(gv.sum(1))
    # dout and out stay in their dtype; rows are upcast per tile (no whole fp32 copies for fp16/bf16); delta only
    # where a matmul tile needs it
    delta = None

    def get_delta():
        nonlocal delta
        if delta is None:
            delta = torch.empty(T, Hq, dtype=acc, device=q.device)                 # [T, Hq]
            for t0, t1 in _chunks(T, Hq * Dv):
                delta[t0:t1] = (dout[t0:t1].to(acc) * out[t0:t1].to(acc)).sum(-1)
            if dlse is not None:
                delta = delta - dlse.to(acc)
        return delta
    for qs, a, b, ks, ke in _own_tiles(plan, Hq, rest):
        n = b - a
        sl = slice(qs + a, qs + b)
        kb = k[ks:ke].to(acc)
        vb = v[ks:ke].to(acc)
        qb = q[sl].to(acc).view(n, Hkv, G, D)
        dob = dout[sl].to(acc).view(n, Hkv, G, Dv)
        s = torch.einsum("ngjd,lgd->ngjl", qb, kb) * scale
        future = torch.arange(ks, ke, device=q.device)[None, :] > plan.q_pos[sl, None]
        s.masked_fill_(future[:, None, None, :], float("-inf"))
        p = torch.exp_(s.sub_(lse[sl].view(n, Hkv, G, 1)))
        dv[ks:ke] += torch.einsum("ngjl,ngjd->lgd", p, dob)
        dp = torch.einsum("ngjd,lgd->ngjl", dob, vb)
        ds = p.mul_(dp.sub_(get_delta()[sl].view(n, Hkv, G, 1))).mul_(scale)
        dq[sl] += torch.einsum("ngjl,lgd->ngjd", ds, kb).reshape(n, Hq, D)
        dk[ks:ke] += torch.einsum("ngjl,ngjd->lgd", ds, qb)
    qf = q.reshape(T * Hq, D)
    dof = dout.reshape(T * Hq, Dv)
    dqf = dq.view(T * Hq, D)
    lsef = lse.reshape(-1)
    groups = plan.groups
    if fused:
        groups = _fused_pieces_bwd(fused, qf, k, v, out.reshape(T * Hq, Dv), dof, lsef, dqf, dk, dv, plan, scale)
    for g, ks, ke, off, n in groups:
        kb = k[ks:ke, g].to(acc)
        vb = v[ks:ke, g].to(acc)
        for a, b in _chunks(n, ke - ks, BWD_TILE):   # p, dp and ds live at once: smaller tiles than the forward's
            r = plan.rows[off + a:off + b]
            qr, dor = qf.index_select(0, r).to(acc), dof.index_select(0, r).to(acc)   # index_select: see forward
            p = torch.exp_((qr @ kb.T).mul_(scale).sub_(lsef.index_select(0, r)[:, None]))      # [n, l]
            dv[ks:ke, g] += p.T @ dor
            ds = p.mul_((dor @ vb.T).sub_(get_delta().view(-1).index_select(0, r)[:, None])).mul_(scale)
            dqf.index_add_(0, r, ds @ kb)
            dk[ks:ke, g] += ds.T @ qr
    return dq, dk, dv
