"""The backward on every backend this machine runs: the selection kept for it, bitwise-repeatable gradients with
``deterministic=True``, and on sm_90 the Gluon dK/dV kernel against the Triton one (the gradients of each shape
against the fp64 reference: test_forward.py and test_varlen.py)."""
import pytest
import torch

import moba
from helpers import (backends, check_against_reference, device_of, errors, make_inputs, moba_fn, naive_fn,
                     needs_cuda, needs_gluon, rel_err, run_with_grads)


@pytest.mark.parametrize("backend", backends("torch", "triton", "gluon"))
@pytest.mark.parametrize("limit,dtype", [(2**15, torch.int16), (8, torch.int32)], ids=["int16", "int32"])
def test_kept_selection_dtype_and_gradients(backend, limit, dtype, monkeypatch):
    """The selection kept for the backward is int16 while every block id fits, else int32; the op's fake shapes
    (torch.compile) agree, and the gradients match the reference either way."""
    from moba import autograd, layout
    monkeypatch.setattr(layout, "SEL16_LIMIT", limit)
    q, k, v, extra = make_inputs([40, 1, 67], [40, 1, 67], 4, 2, 16, dtype=torch.float32, device=device_of(backend))
    cu = extra["cu_seqlens"]
    for x in (q, k, v):
        x.requires_grad_(True)
    args = (q, k, v, cu, cu, 8, 3, 0.25, backend, False, True, None)
    _, _, sel = autograd.moba_fwd(*args)
    assert sel.dtype == dtype and sel.shape == (108, 4, 2)
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
        assert autograd.moba_fwd(*args)[2].dtype == dtype
    check_against_reference(q.detach(), k.detach(), v.detach(), 8, 3, backend, 2e-4, extra)


@pytest.mark.parametrize("backend", backends("triton", "gluon"))
def test_deterministic_grads_repeat_bitwise(backend):
    q, k, v, extra = make_inputs([60], [60], 2, 1, 16, dtype=torch.float32, device=device_of(backend))
    grads = []
    for _ in range(2):
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        moba.moba_attention(qq, kk, vv, 8, 3, backend=backend, deterministic=True).square().sum().backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("backend", backends("triton", "gluon"))
def test_cuda_deterministic_bitwise(backend):
    q, k, v, _ = make_inputs([3000], [3000], 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    res = []
    for _ in range(2):
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        out = moba.moba_attention(qq, kk, vv, 128, 4, backend=backend, deterministic=True)
        out.float().square().sum().backward()
        res.append((out, qq.grad, kk.grad, vv.grad))   # the forward's entry order varies (atomics): not its result
    for a, b in zip(*res):
        assert torch.equal(a, b)


@needs_gluon
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("lens_q,lens_k,Hq,Hkv,D,bs,topk,det", [
    ([1000], [1000], 8, 2, 64, 128, 3, False),
    ([2048], [2048], 4, 4, 128, 256, 3, False),
    ([3001], [3001], 8, 2, 128, 128, 5, False),                  # ragged tail, several row tiles per block
    ([700, 1, 1500, 90], [700, 1, 1500, 90], 6, 3, 128, 64, 4, False),   # packed, uneven, odd heads
    ([300, 17, 1], [900, 400, 64], 8, 2, 128, 64, 4, False),     # fewer queries than keys (chunked prefill)
    ([1500, 90], [1500, 90], 8, 2, 128, 128, 3, True),           # deterministic (stable-sorted entries)
], ids=["T1000-D64", "T2048-D128", "T3001-ragged", "packed-odd-heads", "Tq-under-Tk", "deterministic"])
def test_gluon_dkdv(dtype, lens_q, lens_k, Hq, Hkv, D, bs, topk, det):
    """The Gluon dK/dV kernel (the "gluon" backend on sm_90): gradients within the Triton kernel's error against
    the fp64 reference."""
    q, k, v, extra = make_inputs(lens_q, lens_k, Hq, Hkv, D, dtype=dtype, device="cuda")
    dout = torch.randn(q.shape[:3] + (D,), dtype=torch.float64, device=q.device)
    dlse = torch.zeros(q.shape[:3], dtype=torch.float64, device=q.device)

    def grads(backend):
        return run_with_grads(moba_fn(bs, topk, backend, deterministic=det, **extra), q, k, v, dout, dlse)
    ref = run_with_grads(naive_fn(bs, topk, **extra), *(x.double() for x in (q, k, v)), dout, dlse)
    tri, glu = grads("triton"), grads("gluon")
    for i, name in ((3, "dk"), (4, "dv")):
        assert torch.isfinite(glu[i]).all(), name
        assert rel_err(glu[i], ref[i]) <= 1.2 * rel_err(tri[i], ref[i]) + 1e-3, name
    if det:
        again = grads("gluon")
        assert torch.equal(again[3], glu[3]) and torch.equal(again[4], glu[4])


@needs_cuda
@pytest.mark.parametrize("backend", backends("triton", "gluon"))
def test_cuda_unaligned_rows_go_to_triton(backend):
    """Rows the Gluon kernels' 16-byte copies cannot take (a head stride of 132 elements) go to the Triton
    kernels: still the reference's gradients."""
    import moba.gluon
    q, k, v, _ = make_inputs([1000], [1000], 8, 2, 132, dtype=torch.bfloat16, device="cuda")
    q, k, v = (x[..., :128] for x in (q, k, v))
    assert not moba.gluon.usable(q[0], 128, 128, k[0], v[0])
    got = errors(moba_fn(128, 3, backend), q, k, v, naive_fn(128, 3))
    assert max(got) < 2e-2
