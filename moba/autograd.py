"""MoBA as two PyTorch custom ops (``moba::fwd``, ``moba::bwd``) with fake implementations.

torch.compile traces through them without graph breaks: the offsets are read, the gate runs and the
kernels launch inside the ops; outside, only shapes are known. The autograd formula connects them.
"""
from typing import Optional

import torch
from torch import Tensor

from .layout import make_layout, pack, sel_dtype
from .torch_backend import attention as torch_attention
from .torch_backend import gate


def _lse_dtype(q):
    """The op keeps the log-sum-exp in the accumulation dtype (fp64 for fp64 inputs) for backward;
    ``moba_attention`` hands users float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _forward(q, k, v, cu_q, cu_k, block_size, topk, scale, backend, keep_sel, means, lay=None, group=False):
    lay = lay if lay is not None else make_layout(q, k, block_size, cu_q, cu_k)
    B, Tq, Hq, _ = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    qp, kp, vp = pack(q), pack(k), pack(v)
    lt = lay.tensors(q.device)
    sdt = sel_dtype(B, k.shape[1], block_size, cu_k)
    if backend in ("triton", "gluon"):
        from .triton import decode, fwd, gate as triton_gate
        qp, kp, vp = (x if x.stride(-1) == 1 else x.contiguous() for x in (qp, kp, vp))
        if decode.usable(q, lay, topk, keep_sel):   # one query per sequence: one launch
            if means is None:
                means = triton_gate.block_means(kp, lay, lt)
            out, lse = decode.decode(qp, kp, vp, lay, lt, topk, scale, means, group)
            sel = None
        else:
            out, lse, sel = fwd.forward(qp, kp, vp, lay, lt, topk, scale, keep=keep_sel, means=means, sel_dtype=sdt,
                                        use_gluon=backend == "gluon", group=group)
            if keep_sel and sel.shape[2] < max(topk - 1, 1):   # short sequences: fewer slots than topk - 1
                sel = torch.nn.functional.pad(sel, (0, max(topk - 1, 1) - sel.shape[2]), value=-1)
    else:
        sel = gate.select_past_blocks(qp, kp, lay, lt, topk, means, group)
        if sel.shape[2] == 0:
            sel = torch.full((sel.shape[0], Hq, 1), -1, dtype=torch.int32, device=q.device)
        out, lse = torch_attention.forward(qp, kp, vp, torch_attention.make_plan(sel, lay, lt, Hkv), scale)
        sel = sel.to(sdt) if keep_sel else sel
    if not keep_sel or sel is None:
        sel = torch.empty(0, Hq, max(topk - 1, 1), dtype=sdt, device=q.device)
    return out.view(B, Tq, Hq, Dv).to(q.dtype), lse.view(B, Tq, Hq).to(_lse_dtype(q)), sel


@torch.library.custom_op("moba::fwd", mutates_args=())
def moba_fwd(q: Tensor, k: Tensor, v: Tensor, cu_q: Optional[Tensor], cu_k: Optional[Tensor], block_size: int,
             topk: int, scale: float, backend: str, deterministic: bool, keep_sel: bool,
             means: Optional[Tensor], group: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """-> out [B, Tq, Hq, Dv] (q's dtype), lse [B, Tq, Hq] (fp32; fp64 for fp64 inputs), and the selection kept for backward
    ([B*Tq, Hq, max(topk-1, 1)] global block ids, int16 where they fit (``layout.sel_dtype``) else int32; empty
    when ``keep_sel`` is False). ``group``: the ``gate="group"`` variant."""
    out, lse, sel = _forward(q, k, v, cu_q, cu_k, block_size, topk, scale, backend, keep_sel, means, group=group)
    return out, lse, sel


@moba_fwd.register_fake
def _(q, k, v, cu_q, cu_k, block_size, topk, scale, backend, deterministic, keep_sel, means, group=False):
    B, Tq, Hq, _ = q.shape
    out = q.new_empty(B, Tq, Hq, v.shape[3])
    lse = q.new_empty(B, Tq, Hq, dtype=_lse_dtype(q))
    sdt = sel_dtype(B, k.shape[1], block_size, cu_k)
    sel = q.new_empty(B * Tq if keep_sel else 0, Hq, max(topk - 1, 1), dtype=sdt)
    return out, lse, sel


@torch.library.custom_op("moba::bwd", mutates_args=())
def moba_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             sel: Tensor, cu_q: Optional[Tensor], cu_k: Optional[Tensor], block_size: int, topk: int, scale: float,
             backend: str, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``moba::fwd`` by recomputation from the saved log-sum-exp and selection."""
    lay = make_layout(q, k, block_size, cu_q, cu_k)
    lt = lay.tensors(q.device)
    qp, kp, vp, op, dop = (pack(x) for x in (q, k, v, out, dout))
    lsep = lse.reshape(-1, q.shape[2])
    dlsep = None if dlse is None else dlse.reshape(-1, q.shape[2])
    if backend in ("triton", "gluon"):
        from .triton import bwd
        qp, kp, vp = (x if x.stride(-1) == 1 else x.contiguous() for x in (qp, kp, vp))
        dq, dk, dv = bwd.backward(qp, kp, vp, op, lsep, dop, dlsep, sel, lay, lt, topk, scale, deterministic,
                                  use_gluon=backend == "gluon")
    else:
        plan = torch_attention.make_plan(sel, lay, lt, k.shape[2])
        dq, dk, dv = torch_attention.backward(qp, kp, vp, op, lsep, dop, dlsep, plan, scale)
    return (dq.view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype))


@moba_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, sel, cu_q, cu_k, block_size, topk, scale, backend, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, block_size, topk, scale, backend, deterministic, keep_sel, means, group = inputs
    out, lse, sel = output
    ctx.save_for_backward(q, k, v, out, lse, sel, cu_q, cu_k)
    ctx.args = (block_size, topk, scale, backend, deterministic)


def _backward(ctx, dout, dlse, dsel):
    q, k, v, out, lse, sel, cu_q, cu_k = ctx.saved_tensors
    block_size, topk, scale, backend, deterministic = ctx.args
    if sel.shape[0] != q.shape[0] * q.shape[1]:
        raise RuntimeError("moba: backward through a forward that ran without gradients enabled")
    dq, dk, dv = moba_bwd(dout, dlse, q, k, v, out, lse, sel, cu_q, cu_k, block_size, topk, scale, backend,
                          deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


moba_fwd.register_autograd(_backward, setup_context=_setup_context)
