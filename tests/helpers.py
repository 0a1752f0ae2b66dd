"""Shared test helpers: random packed inputs and comparisons against the fp64 reference."""
import torch

import moba


def make_inputs(lens_q, lens_k, Hq, Hkv, D, Dv=None, dtype=torch.float64, device="cpu", varlen=None):
    """Random q, k, v (+ cu_seqlens) for sequences of the given lengths.

    Equal lengths and ``varlen`` falsy give a [B, T, H, D] batch; otherwise one packed row (B = 1).
    """
    Dv = Dv or D
    if varlen is None:
        varlen = len(set(lens_q)) > 1 or len(set(lens_k)) > 1
    kw = dict(dtype=dtype, device=device)
    if varlen:
        Tq, Tk = sum(lens_q), sum(lens_k)
        q = torch.randn(1, Tq, Hq, D, **kw)
        k = torch.randn(1, Tk, Hkv, D, **kw)
        v = torch.randn(1, Tk, Hkv, Dv, **kw)
        cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
        cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
        extra = dict(cu_seqlens=cu_q, cu_seqlens_k=cu_k if lens_q != lens_k else None)
    else:
        B = len(lens_q)
        q = torch.randn(B, lens_q[0], Hq, D, **kw)
        k = torch.randn(B, lens_k[0], Hkv, D, **kw)
        v = torch.randn(B, lens_k[0], Hkv, Dv, **kw)
        extra = {}
    return q, k, v, extra


def run_with_grads(fn, q, k, v, dout, dlse, **kw):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out, lse = fn(q, k, v, return_lse=True, **kw)
    loss = (out.double() * dout).sum() + (lse.double() * dlse).sum()
    loss.backward()
    return out, lse, q.grad, k.grad, v.grad


def rel_err(a, b):
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any(), "output holds NaN (an element was never written)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_against_reference(q, k, v, block_size, topk, backend, tol, extra, grads=True, **backend_kw):
    """Compare a backend with the fp64 reference, forward, lse and all three gradients."""
    ref_in = [x.double() for x in (q, k, v)]
    fn = lambda *a, **kw: moba.moba_attention(*a, block_size, topk, backend=backend, **kw,  # noqa: E731
                                              **backend_kw)
    ref = lambda *a, **kw: moba.naive_moba_attention(*a, block_size, topk, **kw)  # noqa: E731
    if not grads:
        out, lse = fn(q, k, v, return_lse=True, **extra)
        r_out, r_lse = ref(*ref_in, return_lse=True, **extra)
        assert rel_err(out, r_out) < tol
        assert rel_err(lse, r_lse) < tol
        return
    dout = torch.randn(q.shape[:3] + (v.shape[3],), dtype=torch.float64, device=q.device)
    dlse = torch.randn(q.shape[:3], dtype=torch.float64, device=q.device)
    got = run_with_grads(fn, q, k, v, dout, dlse, **extra)
    want = run_with_grads(ref, *ref_in, dout, dlse, **extra)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        e = rel_err(a, b)
        assert e < tol, f"{name}: relative error {e:.2e} >= {tol:.1e}"
