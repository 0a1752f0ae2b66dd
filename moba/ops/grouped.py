"""The "torch" backend: MoBA in plain PyTorch, grouped by key block, memory-lean (forward and backward;
autograd is wired in ``custom.py``).

Shape of the computation (no Tq x Tk tensor, no fp32 blocks x heads x tokens tensor):
1. the gate (``gate.py``) picks ``topk - 1`` earlier blocks per (query, head) -> int32 [T, Hq, topk-1];
2. own blocks: the queries whose own block is ``b`` are a contiguous run of rows, so each block is one
   small dense causal attention over all heads at once;
3. chosen blocks: the (query, head) rows that chose block ``b`` of kv head ``g`` are gathered (a stable
   sort of the selection) and attend that block's keys in one dense matmul;
4. partial results merge into a running (max, sum, acc) per row, as in FlashAttention's online softmax.
Backward recomputes the same tiles from the saved log-sum-exp (FlashAttention-2 style), no atomics.
Working tiles are bounded by ``TILE`` elements whatever the sequence length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .utils import Layout, LayoutTensors, new_empty

TILE = 1 << 23  # elements of one score tile (fp32: 32 MB)


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


def _chunks(n: int, per_row: int):
    step = max(1, TILE // max(1, per_row))
    for i in range(0, n, step):
        yield i, min(n, i + step)


OWN_ROWS = 128  # queries per own-block tile: a tile reads keys only up to its last query


def _own_tiles(plan: Plan, Hq: int):
    """(q_start, a, b, k_start, k_end): queries q_start+a..q_start+b-1 against keys k_start..k_end-1."""
    pos = None
    for qs, qe, ks, ke in plan.own:
        if pos is None:
            pos = plan.q_pos.tolist()
        for a, b in _chunks(qe - qs, Hq * (ke - ks)):
            for a2 in range(a, b, OWN_ROWS):
                b2 = min(b, a2 + OWN_ROWS)
                yield qs, a2, b2, ks, min(ke, pos[qs + b2 - 1] + 1)


def forward(q, k, v, plan: Plan, scale: float):
    """q [T, Hq, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv] packed -> out [T, Hq, Dv] (acc dtype), lse [T, Hq]."""
    T, Hq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    G = Hq // Hkv
    acc = _acc(q.dtype)
    M = new_empty(T * Hq, dtype=acc, device=q.device)
    L = new_empty(T * Hq, dtype=acc, device=q.device)
    O = new_empty(T * Hq, Dv, dtype=acc, device=q.device)
    qsc = q.to(acc) * scale                                                 # scaled once, gathered below
    # own blocks: dense causal attention of a run of queries over one block, all heads at once
    for qs, a, b, ks, ke in _own_tiles(plan, Hq):
        kb = k[ks:ke].to(acc)                                               # [l, Hkv, D]
        vb = v[ks:ke].to(acc)
        s = torch.einsum("ngjd,lgd->ngjl", qsc[qs + a:qs + b].view(b - a, Hkv, G, D), kb)
        future = torch.arange(ks, ke, device=q.device)[None, :] > plan.q_pos[qs + a:qs + b, None]
        s.masked_fill_(future[:, None, None, :], float("-inf"))             # [n, Hkv, G, l]
        m = s.amax(-1, keepdim=True)
        p = torch.exp_(s.sub_(m))
        r = slice((qs + a) * Hq, (qs + b) * Hq)
        L[r] = p.sum(-1).reshape(-1)
        M[r] = m.reshape(-1)
        O[r] = torch.einsum("ngjl,lgd->ngjd", p, vb).reshape(-1, Dv)
    # chosen earlier blocks: gathered rows against one block of one kv head; never masked
    qf = qsc.view(T * Hq, D)
    for g, ks, ke, off, n in plan.groups:
        kb = k[ks:ke, g].to(acc)                                            # [l, D]
        vb = v[ks:ke, g].to(acc)
        for a, b in _chunks(n, ke - ks):
            r = plan.rows[off + a:off + b]
            s = qf[r] @ kb.T                                                # [n, l]
            m = s.amax(-1)
            p = torch.exp_(s.sub_(m[:, None]))
            m0 = M[r]
            mn = torch.maximum(m0, m)
            a0, a1 = torch.exp(m0 - mn), torch.exp(m - mn)
            L[r] = L[r] * a0 + p.sum(-1) * a1
            O[r] = O[r] * a0[:, None] + (p @ vb) * a1[:, None]
            M[r] = mn
    out = (O / L[:, None]).view(T, Hq, Dv)
    lse = (M + torch.log(L)).view(T, Hq)
    return out, lse


def backward(q, k, v, out, lse, dout, dlse, plan: Plan, scale: float):
    """Gradients by recomputation from the saved log-sum-exp; fp32 (fp64) accumulation."""
    T, Hq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    G = Hq // Hkv
    acc = _acc(q.dtype)
    do = dout.to(acc)
    delta = (do * out.to(acc)).sum(-1)                                      # [T, Hq]
    if dlse is not None:
        delta = delta - dlse.to(acc)
    lse = lse.to(acc)
    dq = torch.zeros(T, Hq, D, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for qs, a, b, ks, ke in _own_tiles(plan, Hq):
        n = b - a
        sl = slice(qs + a, qs + b)
        kb = k[ks:ke].to(acc)
        vb = v[ks:ke].to(acc)
        qb = q[sl].to(acc).view(n, Hkv, G, D)
        dob = do[sl].view(n, Hkv, G, Dv)
        s = torch.einsum("ngjd,lgd->ngjl", qb, kb) * scale
        future = torch.arange(ks, ke, device=q.device)[None, :] > plan.q_pos[sl, None]
        s.masked_fill_(future[:, None, None, :], float("-inf"))
        p = torch.exp_(s.sub_(lse[sl].view(n, Hkv, G, 1)))
        dv[ks:ke] += torch.einsum("ngjl,ngjd->lgd", p, dob)
        dp = torch.einsum("ngjd,lgd->ngjl", dob, vb)
        ds = p.mul_(dp.sub_(delta[sl].view(n, Hkv, G, 1))).mul_(scale)
        dq[sl] += torch.einsum("ngjl,lgd->ngjd", ds, kb).reshape(n, Hq, D)
        dk[ks:ke] += torch.einsum("ngjl,ngjd->lgd", ds, qb)
    qf = q.reshape(T * Hq, D)
    dof = do.reshape(T * Hq, Dv)
    dqf = dq.view(T * Hq, D)
    lsef, deltaf = lse.reshape(-1), delta.reshape(-1)
    for g, ks, ke, off, n in plan.groups:
        kb = k[ks:ke, g].to(acc)
        vb = v[ks:ke, g].to(acc)
        for a, b in _chunks(n, ke - ks):
            r = plan.rows[off + a:off + b]
            qr, dor = qf[r].to(acc), dof[r]
            p = torch.exp_((qr @ kb.T).mul_(scale).sub_(lsef[r, None]))      # [n, l]
            dv[ks:ke, g] += p.T @ dor
            ds = p.mul_((dor @ vb.T).sub_(deltaf[r, None])).mul_(scale)
            dqf.index_add_(0, r, ds @ kb)
            dk[ks:ke, g] += ds.T @ qr
    return dq, dk, dv
