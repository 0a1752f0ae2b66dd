"""Public entry points: ``moba_attention`` and ``select_blocks``; the choice of backend."""
from __future__ import annotations

import os

import torch

from . import autograd
from .layout import check_args, check_gate, make_layout, pack, validate
from .naive import naive_moba_attention
from .torch_backend import gate as torch_gate


def _triton_usable(q: torch.Tensor) -> bool:
    if q.is_cuda:
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, q: torch.Tensor, v: torch.Tensor | None = None) -> str:
    """Turn "auto" into a concrete backend and check that a requested one can run here.

    "auto" takes the Triton kernels for CUDA tensors they support ("gluon" on sm_90 GPUs with the Triton release
    the Gluon kernels were written for, else "triton"), otherwise the exact "torch" backend (never dense
    attention)."""
    if backend == "auto":
        if not (q.is_cuda and _triton_usable(q)):
            return "torch"
        from . import gluon
        from .triton.common import supports
        if not supports(q, v):
            return "torch"
        return "gluon" if gluon.supported(q.device) else "triton"
    if backend in ("triton", "gluon"):
        if not _triton_usable(q):
            raise ValueError(f"backend={backend!r} needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
                             f"set before import) and the triton package")
        if backend == "gluon":
            from . import gluon
            if not gluon.supported(q.device):
                raise ValueError(f"backend='gluon' needs a CUDA sm_90 GPU (H100/H200) and Triton "
                                 f"{'.'.join(gluon.TRITON_VERSION)}.x, the release its kernels were written for; got "
                                 f"{q.device}; backend='triton' runs the Triton kernels on any CUDA GPU")
    return backend


def moba_attention(q, k, v, block_size, topk, *, cu_seqlens=None, cu_seqlens_k=None, scale=None,
                   return_lse=False, backend="auto", deterministic=False, means_cache=None, gate="head"):
    """Mixture of Block Attention.

    Keys are cut into blocks of ``block_size`` tokens from the start of each sequence. A query at
    position ``p`` attends its own block ``p // block_size`` causally, plus the ``topk - 1`` strictly
    earlier blocks whose mean key scores highest against it (all of them if fewer exist)::

        keys    |blk0 |blk1 |blk2 |blk3 |blk4..
        query in blk4, topk=3:   ####        ####  ##<- causal, up to p
                                 (chosen)   (chosen) (own)

    Args:
        q: [B, Tq, Hq, D]. k: [B, Tk, Hkv, D]. v: [B, Tk, Hkv, Dv]. ``Hq % Hkv == 0`` (grouped-query
            attention: query head ``h`` reads kv head ``h // (Hq // Hkv)``; K/V are never copied).
            ``Tq <= Tk``: queries are the *last* ``Tq`` positions of the keys, as in FlashAttention::

                keys     0 1 2 3 4 5 6 7
                queries            0 1 2      (Tq=3, Tk=8: query 0 sits at position 5)

        block_size: tokens per key block (>= 1).
        topk: blocks per query *including* the own block (>= 1); ``topk=1`` is block-local causal
            attention, ``topk >= number of blocks`` equals causal attention.
        cu_seqlens: int32 [N+1] offsets of N sequences packed along T (B must be 1). On q's device or on
            the CPU: the offsets are read on the host, so a CPU tensor saves a device sync per call.
        cu_seqlens_k: the keys' offsets when they differ from the queries' (chunked prefill, decoding).
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp, float32 [B, Tq, Hq], natural log.
        backend: "auto" (the GPU kernels on CUDA, else "torch"), "torch" (PyTorch ops, any device), "naive"
            (the fp32/fp64 reference, materialises scores), "triton" (the Triton kernels: CUDA, or CPU tensors
            under TRITON_INTERPRET=1) or "gluon" (the Triton kernels with the sm_90 Gluon kernels where they
            apply: 16-bit, head dim 64 or 128, the forward's for blocks of at least 128 keys; what "auto" picks on
            H100/H200 with Triton 3.6).
        deterministic: Triton backward without atomics (bitwise-repeatable dQ). It keeps one fp32 dQ row
            per (query, head, chosen block): T * Hq * (topk - 1) * D * 4 bytes, 1.1 GB at 32K tokens with
            32 heads, topk 3, D 128 — meant for debugging and short sequences. The other backends are
            always deterministic on a given device.
        means_cache: a :class:`moba.BlockMeansCache` for decoding from growing KV caches (one sequence,
            a batch, or packed sequences through cu_seqlens_k): the gate's block means are updated with
            the newly completed blocks only, instead of re-pooling every cached key at every step.
        gate: ``"head"`` (MoBA as defined above: every query head scores and chooses its own blocks) or ``"group"``
            (a variant, not the paper's MoBA: the query heads that share a kv head choose the same blocks, by the
            sum of their scores ``<q_h, mean>`` over the group; with grouped-query attention a decode step then
            reads ``topk`` blocks per kv head instead of the union of its heads' choices). Train and serve a model
            with the same gate; experiments/RESULTS.md (section 6) gives its measured cost in quality.

    Returns:
        ``out`` [B, Tq, Hq, Dv] in q's dtype, or ``(out, lse)``. Gradients flow to q, k and v; the gate is
        a hard selection without gradient.

    Example:
        >>> q = torch.randn(1, 1000, 4, 64); k = torch.randn(1, 1000, 2, 64); v = torch.randn(1, 1000, 2, 64)
        >>> moba_attention(q, k, v, block_size=128, topk=3).shape
        torch.Size([1, 1000, 4, 64])
    """
    sc = check_args(q, k, v, block_size, topk, cu_seqlens, cu_seqlens_k, scale, backend)
    group = check_gate(gate)
    backend = resolve_backend(backend, q, v)
    if backend == "naive":
        return naive_moba_attention(q, k, v, block_size, topk, cu_seqlens=cu_seqlens,
                                    cu_seqlens_k=cu_seqlens_k, scale=sc, return_lse=return_lse, gate=gate)
    if backend in ("triton", "gluon"):
        from .triton.common import MAX_HEAD_DIM, supports
        if not supports(q, v):
            raise ValueError(f"backend={backend!r} supports float16, bfloat16 and float32 with head dims <= "
                             f"{MAX_HEAD_DIM}; got {q.dtype} with head dims {q.shape[-1]} (q, k) and "
                             f"{v.shape[-1]} (v); backend='torch' takes any")
    means = lay = None
    if means_cache is not None:
        lay = make_layout(q, k, block_size, cu_seqlens, cu_seqlens_k)
        with torch.no_grad():
            means = means_cache.means(pack(k).detach(), block_size, lay.cu_k if len(lay.cu_k) > 2 else None)
    keep_sel = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if keep_sel or torch.compiler.is_compiling():
        out, lse, _ = autograd.moba_fwd(q, k, v, cu_seqlens, cu_seqlens_k, block_size, topk, sc, backend,
                                      deterministic, keep_sel, means, group)
    else:   # eager inference: the op's body without the dispatcher (host time is most of a decode step)
        out, lse, _ = autograd._forward(q, k, v, cu_seqlens, cu_seqlens_k, block_size, topk, sc, backend, False,
                                      means, lay, group)
    if return_lse:
        return out, lse.float()
    return out


@torch.no_grad()
def select_blocks(q, k, block_size, topk, *, cu_seqlens=None, cu_seqlens_k=None, gate="head"):
    """The blocks each (query, head) reads: int32 [B, Tq, Hq, topk].

    Slot 0 is the own block; then the chosen earlier blocks by decreasing gate score; -1 where fewer
    than ``topk - 1`` earlier blocks exist. Block ids count from the start of each query's sequence.
    ``gate`` as in :func:`moba_attention`.
    """
    lay, _ = validate(q, k, k, block_size, topk, cu_seqlens, cu_seqlens_k)
    group = check_gate(gate)
    qp, kp = pack(q), pack(k)
    lt = lay.tensors(q.device)
    sel = torch_gate.select_past_blocks(qp, kp, lay, lt, topk, group=group)
    return torch_gate.to_local(sel, lay, lt).view(q.shape[0], q.shape[1], q.shape[2], topk)
