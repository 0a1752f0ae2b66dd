"""Shared test helpers: the backends this machine runs, random packed inputs, comparisons against the fp64 reference,
and the named input shapes that the forward, backward and packed-sequence tests share."""
import os

import pytest
import torch

import moba
import moba.gluon

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _triton_importable():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# The Triton kernels run compiled on a CUDA GPU, or in Triton's interpreter on the CPU (conftest.py sets
# TRITON_INTERPRET=1 without a GPU). The Gluon kernels need an sm_90 GPU and the Triton release they were written for.
TRITON = _triton_importable() and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")
GLUON = CUDA and TRITON and moba.gluon.supported("cuda")
ALL_BACKENDS = ("torch", "naive", "triton", "gluon")

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(not TRITON, reason="needs triton, and a CUDA GPU or TRITON_INTERPRET=1")
needs_gluon = pytest.mark.skipif(not GLUON, reason="the Gluon kernels need an sm_90 GPU (H100/H200) and Triton "
                                                   + ".".join(moba.gluon.TRITON_VERSION))


def available(backend):
    return backend in ("torch", "naive") or (backend == "triton" and TRITON) or (backend == "gluon" and GLUON)


def backends(*names):
    """The backends of ``names`` (default: all) that this machine runs: "torch" and "naive" everywhere; "triton" on
    a CUDA GPU or under Triton's interpreter; "gluon" on an sm_90 GPU with the Triton its kernels were written for."""
    return [b for b in (names or ALL_BACKENDS) if available(b)]


def device_of(backend):
    """Where a backend's tests run: the Triton and Gluon kernels on the GPU if there is one; "torch" and "naive"
    on the CPU, in fp64 against the reference."""
    return DEVICE if backend in ("triton", "gluon") else "cpu"


DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def runs_dtype(backend, dtype):
    """Whether ``backend`` takes ``dtype`` here: the kernels take 16/32-bit floats, and under the interpreter bf16
    arithmetic is wrong (it works on raw bits), so only fp32 and fp16 there."""
    if backend in ("triton", "gluon"):
        return dtype in (torch.float32, torch.float16) or (dtype == torch.bfloat16 and CUDA)
    return True


def backend_dtypes(dtypes, *names):
    """pytest params (backend, dtype) of every available backend of ``names`` and every dtype it runs here."""
    return [pytest.param(b, dt, id=f"{b}-{DTYPE_IDS[dt]}") for b in backends(*names) for dt in dtypes
            if runs_dtype(b, dt)]


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


def errors(fn, q, k, v, ref_fn):
    """Relative errors of out, dq, dk, dv against ``ref_fn`` in fp64 (gradients through the output alone)."""
    dout = torch.randn(q.shape[:3] + (v.shape[3],), dtype=torch.float64, device=q.device)
    dlse = torch.zeros(q.shape[:3], dtype=torch.float64, device=q.device)
    got = run_with_grads(fn, q, k, v, dout, dlse)
    want = run_with_grads(ref_fn, *(x.double() for x in (q, k, v)), dout, dlse)
    return [rel_err(a, b) for i, (a, b) in enumerate(zip(got, want)) if i != 1]


def moba_fn(bs, topk, backend="auto", **kw):
    return lambda a, b, c, return_lse: moba.moba_attention(a, b, c, bs, topk, return_lse=True, backend=backend, **kw)


def naive_fn(bs, topk, **kw):
    return lambda a, b, c, return_lse: moba.naive_moba_attention(a, b, c, bs, topk, return_lse=True, **kw)


# Named shapes (lens_q, lens_k, Hq, Hkv, D, block, topk): one batch or one sequence in SHAPES; packed sequences of
# uneven lengths and fewer queries than keys in VARLEN. Every backend runs each against the fp64 reference
# (test_forward.py, test_varlen.py) and the torch backend's fused CPU tiles run each too (test_cpu_fused.py).
SHAPES = {
    "T100-D48-ragged-tail": ([100], [100], 4, 4, 48, 16, 3),           # T not a multiple of the block
    "T100-D32-gqa2": ([100], [100], 4, 2, 32, 16, 3),                   # ragged tail, GQA 2
    "T-under-block": ([10], [10], 2, 1, 16, 16, 3),                     # T < block
    "T1": ([1], [1], 2, 2, 16, 8, 2),
    "batch2-D80-gqa2": ([130, 130], [130, 130], 6, 3, 80, 32, 2),       # batch of 2, head dim 80
    "gqa4": ([77], [77], 8, 2, 32, 8, 4),
    "topk1-own-block-only": ([64], [64], 2, 2, 16, 16, 1),
    "D48-padded-to-64": ([130], [130], 2, 1, 48, 32, 2),                # the kernels pad the head dim inside
    "topk-covers-everything": ([90, 90], [90, 90], 2, 2, 16, 16, 20),
    "topk64-of-75-blocks": ([300], [300], 2, 1, 16, 4, 64),             # 63 chosen blocks per row
}
VARLEN = {
    "packed-uneven-gqa2": ([40, 1, 67, 13], [40, 1, 67, 13], 4, 2, 16, 8, 3),   # a length-1 sequence among them
    "packed-uneven-gqa4": ([40, 1, 67, 13], [40, 1, 67, 13], 4, 1, 16, 8, 3),
    "chunked-prefill": ([16], [100], 4, 2, 16, 16, 3),                  # Tq < Tk
    "decode-one-query": ([1], [150], 4, 1, 16, 16, 4),                  # Tq = 1
    "decode-packed-rows": ([1, 1], [75, 33], 2, 2, 16, 16, 4),          # one query per sequence of a packed batch
    "packed-Tq-under-Tk-odd-heads": ([5, 1, 20], [50, 9, 20], 3, 3, 16, 8, 2),
    "query-tile-straddles-own-blocks": ([1, 17], [130, 200], 2, 1, 16, 64, 3),
    "empty-query-sequence-D8": ([0, 30], [12, 30], 2, 1, 8, 4, 3),
    "empty-query-sequence-D16": ([0, 30], [12, 30], 2, 1, 16, 4, 3),
}


def check_shape(backend, lens_q, lens_k, Hq, Hkv, D, bs, topk):
    """One named shape against the fp64 reference, forward, log-sum-exp and gradients: the torch backend in fp64
    (V's head dim unlike Q's) to 1e-10; the kernels in fp32 to 2e-4, with both their backwards (atomic dQ sums, and
    ``deterministic``)."""
    if backend in ("triton", "gluon"):
        q, k, v, extra = make_inputs(lens_q, lens_k, Hq, Hkv, D, dtype=torch.float32, device=device_of(backend))
        check_both_backwards(q, k, v, bs, topk, backend, 2e-4, extra)
    else:
        q, k, v, extra = make_inputs(lens_q, lens_k, Hq, Hkv, D, Dv=D + 8)
        check_against_reference(q, k, v, bs, topk, backend, 1e-10, extra)


def check_both_backwards(q, k, v, block_size, topk, backend, tol, extra):
    """``check_against_reference`` for the kernels' two backwards from one forward: the forward does not depend on
    ``deterministic`` and is most of the time under Triton's interpreter, so it runs once (the custom op, as
    moba_attention calls it), its gradients come through the op's autograd formula (atomic dQ sums) and then from
    the backward op again with ``deterministic=True``."""
    from moba import autograd
    cu_q, cu_k = extra.get("cu_seqlens"), extra.get("cu_seqlens_k")
    scale = q.shape[-1] ** -0.5
    dout = torch.randn(q.shape[:3] + (v.shape[3],), dtype=torch.float64, device=q.device)
    dlse = torch.randn(q.shape[:3], dtype=torch.float64, device=q.device)
    want = run_with_grads(lambda *a, **kw: moba.naive_moba_attention(*a, block_size, topk, **kw),
                          *(x.double() for x in (q, k, v)), dout, dlse, **extra)
    qq, kk, vv = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out, lse, sel = autograd.moba_fwd(qq, kk, vv, cu_q, cu_k, block_size, topk, scale, backend, False, True, None)
    ((out.double() * dout).sum() + (lse.double() * dlse).sum()).backward()
    det = autograd.moba_bwd(dout.to(out.dtype), dlse.to(lse.dtype), q, k, v, out.detach(), lse.detach(), sel, cu_q,
                            cu_k, block_size, topk, scale, backend, True)
    got = {"out": out, "lse": lse, "dq": qq.grad, "dk": kk.grad, "dv": vv.grad,
           "dq (deterministic)": det[0], "dk (deterministic)": det[1], "dv (deterministic)": det[2]}
    for name, a in got.items():
        e = rel_err(a, want[("out", "lse", "dq", "dk", "dv").index(name.split()[0])])
        assert e < tol, f"{name}: relative error {e:.2e} >= {tol:.1e}"
