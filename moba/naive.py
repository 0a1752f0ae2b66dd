"""The readable MoBA reference: pooled-key gate, top-k, explicit mask, softmax, in fp32 (fp64 for fp64).

It materialises a [H, Tq, Tk] score matrix per sequence, so it is for tests and small inputs only.
"""
from __future__ import annotations

import torch

from .layout import check_gate, validate


def _ref_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def naive_select(qs, ks, block_size, topk, gate="head"):
    """Gate for one sequence. qs [Tq, Hq, D], ks [Tk, Hkv, D] -> [Tq, Hq, topk] local block ids, -1 unused.

    Slot 0 is the own block; the rest are the chosen earlier blocks by decreasing gate score. ``gate="group"``: a
    block's score is the sum of its scores for the query heads of one kv head, and those heads choose alike.
    """
    Tq, Hq, D = qs.shape
    Tk, Hkv, _ = ks.shape
    dt = _ref_dtype(qs.dtype)
    G = Hq // Hkv
    nb = -(-Tk // block_size)
    pos = torch.arange(Tk - Tq, Tk, device=qs.device)
    own = pos // block_size                                                       # [Tq]
    out = torch.full((Tq, Hq, topk), -1, dtype=torch.int32, device=qs.device)
    out[:, :, 0] = own[:, None].to(torch.int32)
    if topk == 1 or nb < 2:
        return out
    pad = nb * block_size - Tk
    kp = torch.nn.functional.pad(ks.to(dt), (0, 0, 0, 0, 0, pad)).view(nb, block_size, Hkv, D)
    cnt = torch.clamp(Tk - torch.arange(nb, device=qs.device) * block_size, max=block_size)
    means = kp.sum(1) / cnt[:, None, None].to(dt)                                # [nb, Hkv, D]
    means = means.repeat_interleave(G, dim=1)                                     # [nb, Hq, D]
    score = torch.einsum("thd,bhd->thb", qs.to(dt), means)                        # [Tq, Hq, nb]
    if gate == "group":
        score = score.view(Tq, Hkv, G, nb).sum(2, keepdim=True).expand(Tq, Hkv, G, nb).reshape(Tq, Hq, nb)
    past = torch.arange(nb, device=qs.device)[None, :] < own[:, None]             # [Tq, nb]
    score = score.masked_fill(~past[:, None, :], float("-inf"))
    n = min(topk - 1, nb)
    val, idx = score.topk(n, dim=-1)
    idx = torch.where(torch.isfinite(val), idx, torch.full_like(idx, -1))
    out[:, :, 1:1 + n] = idx.to(torch.int32)
    return out


def naive_moba_attention(q, k, v, block_size, topk, *, cu_seqlens=None, cu_seqlens_k=None, scale=None,
                         return_lse=False, gate="head"):
    """Reference MoBA attention; same contract as :func:`moba.moba_attention` (differentiable)."""
    lay, scale = validate(q, k, v, block_size, topk, cu_seqlens, cu_seqlens_k, scale)
    check_gate(gate)
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    dt = _ref_dtype(q.dtype)
    qp, kp, vp = (x.reshape(-1, x.shape[2], x.shape[3]) for x in (q, k, v))
    outs, lses = [], []
    for i in range(lay.n_seqs):
        qs = qp[lay.cu_q[i]:lay.cu_q[i + 1]]
        ks = kp[lay.cu_k[i]:lay.cu_k[i + 1]]
        vs = vp[lay.cu_k[i]:lay.cu_k[i + 1]]
        Tqs, Tks = qs.shape[0], ks.shape[0]
        if Tqs == 0:
            outs.append(qs.new_zeros(0, Hq, v.shape[3], dtype=dt))
            lses.append(qs.new_zeros(0, Hq, dtype=torch.float32))
            continue
        with torch.no_grad():
            sel = naive_select(qs.detach(), ks.detach(), block_size, topk, gate).long()  # [Tq, Hq, topk]
        key_blk = torch.arange(Tks, device=q.device) // block_size                # [Tk]
        pos = torch.arange(Tks - Tqs, Tks, device=q.device)
        chosen = (sel[..., None] == key_blk).any(2)                              # [Tq, Hq, Tk]
        causal = torch.arange(Tks, device=q.device)[None, :] <= pos[:, None]      # [Tq, Tk]
        mask = chosen & causal[:, None, :]
        kr = ks.to(dt).repeat_interleave(G, dim=1)
        vr = vs.to(dt).repeat_interleave(G, dim=1)
        s = torch.einsum("qhd,khd->qhk", qs.to(dt), kr) * scale
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)                                          # [Tq, Hq]
        p = torch.exp(s - lse[..., None])
        outs.append(torch.einsum("qhk,khd->qhd", p, vr))
        lses.append(lse.float())
    out = torch.cat(outs).view(B, Tq, Hq, v.shape[3]).to(q.dtype)
    if return_lse:
        return out, torch.cat(lses).view(B, Tq, Hq)
    return out
