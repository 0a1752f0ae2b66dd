"""MoBA and dense causal attention over a sequence sharded across the ranks of a process group.

``allgather``: K/V (and with them the block means, computed from the gathered keys) are all-gathered; each rank's
queries stay local and every run of consecutive queries it holds attends its key prefix through the single-device
kernels' Tq < Tk path (queries end-aligned to their keys). The backward gathers K/V again rather than keeping the
gathered copy between forward and backward, and reduce-scatters dK/dV to the ranks that own those tokens.

``ulysses``: an all-to-all turns sequence shards into head shards (each rank: the whole sequence, H/P heads), the
single-device attention runs on them, and an all-to-all turns the output back.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import autograd as moba_autograd
from ..api import resolve_backend
from ..layout import BACKENDS, GATES, check_args, check_gate
from ..naive import naive_moba_attention
from . import comm

SCHEMES = ("allgather", "ulysses")


# ----------------------------------------------------------------------------------------------------------
# validation: the same verdict on every rank
# ----------------------------------------------------------------------------------------------------------
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _local_error(q, k, v, block_size, topk, group, layout, scheme, cu_seqlens, scale, backend, P, dense, gate):
    """What is wrong with this rank's arguments, as a ValueError message, or None."""
    if layout not in comm.LAYOUTS:
        return f"layout must be one of {comm.LAYOUTS}, got {layout!r}"
    if scheme not in SCHEMES:
        return f"scheme must be one of {SCHEMES}, got {scheme!r}"
    try:
        if dense:
            check_args(q, k, v, 1, 1, None, None, scale, "auto")
        else:
            check_args(q, k, v, block_size, topk, None, None, scale, backend)
            check_gate(gate)
    except ValueError as e:
        return str(e)
    B, n, Hq = q.shape[:3]
    Hkv = k.shape[2]
    if k.shape[1] != n:
        return f"q, k and v shards must hold the same tokens (the sequence dim 1), got {n} queries and {k.shape[1]} keys"
    if layout == "zigzag" and n % 2:
        return (f"with layout='zigzag' each shard holds two chunks of equal length, so its length must be even, "
                f"got {n}")
    if scheme == "ulysses" and Hkv % P:
        return (f"scheme='ulysses' splits the heads over the {P} ranks: the kv heads ({Hkv}) must be a multiple "
                f"of the group size; use scheme='allgather'")
    if cu_seqlens is not None:
        if B != 1:
            return f"with cu_seqlens the batch size must be 1 (documents packed along T), got {B}"
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            return "cu_seqlens must be a 1-D integer tensor of at least 2 offsets ([0, ..., T])"
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != n * P or any(b < a for a, b in zip(cu, cu[1:])):
            return (f"cu_seqlens must describe the whole sequence of the {P} shards: start at 0, be non-decreasing "
                    f"and end at {n * P} ({n} tokens per rank), got {cu}")
    return None


def _validate(q, k, v, block_size, topk, group, layout, scheme, cu_seqlens, scale, backend, dense=False, gate="head"):
    """Check the arguments on every rank and compare them across ranks (one small all-gather): raises the same
    ValueError on every rank when any rank's arguments are wrong or the ranks disagree, instead of hanging in a
    collective that some rank never joins."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("moba.distributed needs torch.distributed initialised (dist.init_process_group)")
    rank, P = comm.world(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given group")
    err = _local_error(q, k, v, block_size, topk, group, layout, scheme, cu_seqlens, scale, backend, P, dense, gate)
    if P == 1:
        if err:
            raise ValueError(err)
        return
    shape = lambda t: list(t.shape) if isinstance(t, torch.Tensor) and t.dim() == 4 else [-1] * 4  # noqa: E731
    cu = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 else []
    meta = [int(err is not None), *shape(q), *shape(k), *shape(v),
            _DTYPES.index(q.dtype) if isinstance(q, torch.Tensor) and q.dtype in _DTYPES else -1,
            int(block_size) if isinstance(block_size, int) else -1, int(topk) if isinstance(topk, int) else -1,
            comm.LAYOUTS.index(layout) if layout in comm.LAYOUTS else -1,
            SCHEMES.index(scheme) if scheme in SCHEMES else -1,
            BACKENDS.index(backend) if backend in BACKENDS else -1, GATES.index(gate) if gate in GATES else -1,
            len(cu), hash(tuple(cu)) % (1 << 62)]
    dev = q.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    mine = torch.tensor(meta, dtype=torch.int64, device=dev)
    every = torch.empty(P * len(meta), dtype=torch.int64, device=dev)
    comm._all_gather_single(every, mine, group=group)
    every = every.view(P, len(meta)).tolist()
    if err is not None:
        raise ValueError(err)
    bad = [r for r, m in enumerate(every) if m[0]]
    if bad:
        raise ValueError(f"moba.distributed: rank(s) {bad} of the group rejected their arguments (see their error)")
    names = ["q shape"] * 4 + ["k shape"] * 4 + ["v shape"] * 4 + [
        "dtype", "block_size", "topk", "layout", "scheme", "backend", "gate", "cu_seqlens", "cu_seqlens"]
    for i, name in enumerate(names, start=1):
        vals = [m[i] for m in every]
        if len(set(vals)) > 1:
            raise ValueError(f"moba.distributed: the ranks disagree on {name} (every rank must pass shards of equal "
                             f"length and the same settings); per rank: {vals}")


# ----------------------------------------------------------------------------------------------------------
# the query runs of a rank and the keys each reads
# ----------------------------------------------------------------------------------------------------------
def _runs(n: int, rank: int, P: int, layout: str, cu: list | None):
    """For each run of consecutive queries this rank holds: (local start, length, first key, end, cu_q, cu_k): its
    queries attend keys [first key, end) of the whole sequence, ``end`` being the run's own end; with documents
    (``cu``), cu_q/cu_k describe the documents the run meets (each document's keys from its start up to the run's
    end), else None."""
    out = []
    for ls, gs, L in comm.chunks(n, rank, P, layout):
        ge = gs + L
        if cu is None:
            out.append((ls, L, 0, ge, None, None))
            continue
        docs = [(a, b) for a, b in zip(cu, cu[1:]) if a < ge and b > gs and b > a]
        k0 = docs[0][0]
        cu_q = [0] + [min(b, ge) - gs for _, b in docs]
        cu_k = [0] + [min(b, ge) - k0 for _, b in docs]
        out.append((ls, L, k0, ge, torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)))
    return out


# ----------------------------------------------------------------------------------------------------------
# allgather
# ----------------------------------------------------------------------------------------------------------
class _AllGatherMoBA(torch.autograd.Function):
    """Local queries against the gathered keys, through ``moba::fwd``/``moba::bwd`` per query run; K/V gathered
    again in the backward."""

    @staticmethod
    def forward(ctx, q, k, v, block_size, topk, scale, backend, deterministic, group, layout, cu, group_gate):
        rank, P = comm.world(group)
        kf, vf = (comm.gather_sequence(x, group, layout) for x in (k, v))
        runs = _runs(q.shape[1], rank, P, layout, cu)
        outs, lses, sels = [], [], []
        for ls, L, k0, end, cu_q, cu_k in runs:
            out, lse, sel = moba_autograd.moba_fwd(q[:, ls:ls + L], kf[:, k0:end], vf[:, k0:end],
                                                   cu_q, cu_k, block_size, topk, scale, backend, deterministic,
                                                   True, None, group_gate)
            outs.append(out)
            lses.append(lse)
            sels.append(sel)
        out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        lse = torch.cat(lses, 1) if len(lses) > 1 else lses[0]
        ctx.save_for_backward(q, k, v, out, lse, *sels)
        ctx.args = (block_size, topk, scale, backend, deterministic, group, layout, runs)
        ctx.set_materialize_grads(False)     # an unused lse gets no zero gradient to read
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *sels = ctx.saved_tensors
        block_size, topk, scale, backend, deterministic, group, layout, runs = ctx.args
        dout = torch.zeros_like(out) if dout is None else dout
        kf, vf = (comm.gather_sequence(x, group, layout) for x in (k, v))
        dkf, dvf = torch.zeros_like(kf), torch.zeros_like(vf)
        dq = torch.empty_like(q)
        for (ls, L, k0, end, cu_q, cu_k), sel in zip(runs, sels):
            sl = slice(ls, ls + L)
            dq_r, dk_r, dv_r = moba_autograd.moba_bwd(
                dout[:, sl].contiguous(), None if dlse is None else dlse[:, sl].contiguous(), q[:, sl],
                kf[:, k0:end], vf[:, k0:end], out[:, sl], lse[:, sl], sel, cu_q, cu_k, block_size,
                topk, scale, backend, deterministic)
            dq[:, sl] = dq_r
            dkf[:, k0:end] += dk_r
            dvf[:, k0:end] += dv_r
        del kf, vf
        dk, dv = (comm.scatter_sequence_sum(x, group, layout) for x in (dkf, dvf))
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


def _naive_allgather(q, k, v, block_size, topk, scale, group, layout, cu, gate):
    """The reference backend: the naive attention per query run on gathered K/V, with autograd throughout."""
    rank, P = comm.world(group)
    kf, vf = (comm.GatherSequence.apply(x, group, layout) for x in (k, v))
    outs, lses = [], []
    for ls, L, k0, end, cu_q, cu_k in _runs(q.shape[1], rank, P, layout, cu):
        o, lse = naive_moba_attention(q[:, ls:ls + L], kf[:, k0:end], vf[:, k0:end], block_size, topk,
                                      cu_seqlens=cu_q, cu_seqlens_k=cu_k, scale=scale, return_lse=True, gate=gate)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 1)


# ----------------------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------------------
def moba_attention(q, k, v, block_size, topk, *, group=None, layout="zigzag", scheme="allgather", cu_seqlens=None,
                   scale=None, return_lse=False, backend="auto", deterministic=False, validate=True, gate="head"):
    """MoBA over a sequence sharded across the ranks of ``group`` (context parallelism).

    q [B, n, Hq, D], k [B, n, Hkv, D], v [B, n, Hkv, Dv] are this rank's shards of the whole sequence of
    T = P * n tokens, as :func:`moba.distributed.shard` makes them (``layout``); the result is this rank's shard of
    exactly what :func:`moba.moba_attention` returns on the whole sequence (``(out, lse)`` with ``return_lse``),
    and gradients flow to the local shards. Blocks count from each document's start, as on one device; block and
    document boundaries need not align with shard boundaries.

    Args:
        group: the process group (default: the world).
        layout: "zigzag" (rank r holds chunks r and 2P-1-r of 2P) or "contiguous" (chunk r of P).
        scheme: "allgather" (K/V gathered, queries local) or "ulysses" (all-to-all to head shards; the kv heads
            must be a multiple of P).
        cu_seqlens: int32 [N+1] offsets of the documents packed in the WHOLE sequence (B must be 1); the same
            tensor on every rank (on the CPU, or on q's device).
        backend, deterministic, scale, gate: as in :func:`moba.moba_attention`.
        validate: compare shapes and settings across the ranks first (one small all-gather), so that a mistake
            raises the same ValueError on every rank; ``False`` skips it (mismatched shards then hang or fail).

    Example (``torchrun --nproc-per-node 2``)::

        dist.init_process_group("nccl")
        q, k, v = (moba.distributed.shard(x) for x in (q_full, k_full, v_full))
        out = moba.distributed.moba_attention(q, k, v, 4096, 12)        # this rank's shard of the output
    """
    if validate:
        _validate(q, k, v, block_size, topk, group, layout, scheme, cu_seqlens, scale, backend, gate=gate)
    P = dist.get_world_size(group)
    sc = check_args(q, k, v, block_size, topk, None, None, scale, backend)
    if P == 1:     # both layouts are the identity on one rank
        from ..api import moba_attention as single
        return single(q, k, v, block_size, topk, cu_seqlens=cu_seqlens, scale=sc, return_lse=return_lse,
                      backend=backend, deterministic=deterministic, gate=gate)
    if scheme == "ulysses":
        qh, kh, vh = (comm.seq_to_heads_grad(x, group, layout) for x in (q, k, v))
        from ..api import moba_attention as single
        out, lse = single(qh, kh, vh, block_size, topk, cu_seqlens=cu_seqlens, scale=sc, return_lse=True,
                          backend=backend, deterministic=deterministic, gate=gate)
        out = comm.heads_to_seq_grad(out, group, layout)
        if not return_lse:
            return out
        return out, comm.heads_to_seq_grad(lse[..., None], group, layout)[..., 0]
    cu = None if cu_seqlens is None else cu_seqlens.tolist()
    be = resolve_backend(backend, q, v)
    if be == "naive":
        out, lse = _naive_allgather(q, k, v, block_size, topk, sc, group, layout, cu, gate)
    else:
        out, lse = _AllGatherMoBA.apply(q, k, v, block_size, topk, sc, be, deterministic, group, layout, cu,
                                        check_gate(gate))
        lse = lse.float()
    return (out, lse) if return_lse else out


def dense_attention(q, k, v, *, group=None, layout="zigzag", scheme="allgather", cu_seqlens=None, scale=None,
                    validate=True):
    """Dense causal attention over a sharded sequence, for the full-attention layers of a hybrid model: the same
    schemes and layouts as :func:`moba_attention`, through PyTorch's SDPA (its fastest kernel for the inputs) on
    each run of local queries against the gathered keys, end-aligned (``causal_lower_right``), per document.
    GQA through SDPA's ``enable_gqa`` (no repeated K/V). Returns this rank's shard of the output."""
    if validate:
        _validate(q, k, v, 1, 1, group, layout, scheme, cu_seqlens, scale, "auto", dense=True)
    rank, P = comm.world(group)
    sc = check_args(q, k, v, 1, 1, None, None, scale, "auto")
    cu = None if cu_seqlens is None else cu_seqlens.tolist()
    if scheme == "ulysses" and P > 1:
        qh, kh, vh = (comm.seq_to_heads_grad(x, group, layout) for x in (q, k, v))
        out = _dense_runs(qh, kh, vh, _runs(qh.shape[1], 0, 1, "contiguous", cu), sc)
        return comm.heads_to_seq_grad(out, group, layout)
    kf, vf = (comm.GatherSequence.apply(x, group, layout) for x in (k, v))
    return _dense_runs(q, kf, vf, _runs(q.shape[1], rank, P, layout, cu), sc)


def _sdpa(q, k, v, scale):
    """Causal attention of q [B, Tq, Hq, D] (the last Tq positions) over k/v [B, Tk, Hkv, D]."""
    from torch.nn.attention.bias import causal_lower_right
    Tq, Tk = q.shape[1], k.shape[1]
    mask = causal_lower_right(Tq, Tk) if Tq != Tk else None
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=mask is None, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def _dense_runs(q, kf, vf, runs, scale):
    outs = []
    for ls, L, k0, end, cu_q, cu_k in runs:
        if cu_q is None:
            outs.append(_sdpa(q[:, ls:ls + L], kf[:, k0:end], vf[:, k0:end], scale))
            continue
        cq, ck = cu_q.tolist(), cu_k.tolist()
        for i in range(len(cq) - 1):     # one call per document the run meets
            outs.append(_sdpa(q[:, ls + cq[i]:ls + cq[i + 1]], kf[:, k0 + ck[i]:k0 + ck[i + 1]],
                              vf[:, k0 + ck[i]:k0 + ck[i + 1]], scale))
    return torch.cat(outs, 1) if len(outs) > 1 else outs[0]
