"""Bad input gets a ValueError that names the argument."""
import pytest
import torch

import moba
from helpers import CUDA, GLUON, backends, device_of, make_inputs


def qkv(B=1, Tq=32, Tk=32, Hq=4, Hkv=2, D=16, Dv=16, dtype=torch.float32):
    return (torch.randn(B, Tq, Hq, D, dtype=dtype), torch.randn(B, Tk, Hkv, D, dtype=dtype),
            torch.randn(B, Tk, Hkv, Dv, dtype=dtype))


def cu(*xs, dtype=torch.int32):
    return torch.tensor(xs, dtype=dtype)


BAD = [
    ("block_size", lambda: (qkv(), dict(block_size=0))),
    ("block_size", lambda: (qkv(), dict(block_size=2.0))),
    ("topk", lambda: (qkv(), dict(topk=0))),
    ("4-D", lambda: ((torch.randn(32, 4, 16),) + qkv()[1:], {})),
    ("k and v", lambda: ((qkv()[0], qkv()[1], torch.randn(1, 31, 2, 16)), {})),
    ("head dim", lambda: ((qkv()[0], torch.randn(1, 32, 2, 8), torch.randn(1, 32, 2, 16)), {})),
    ("multiple", lambda: (qkv(Hq=4, Hkv=3), {})),
    ("dtype", lambda: ((qkv()[0].double(),) + qkv()[1:], {})),
    ("float16", lambda: ((qkv()[0].int(),) + qkv()[1:], {})),
    ("outnumber", lambda: (qkv(Tq=40, Tk=32), {})),
    ("batch size", lambda: (qkv(B=2), dict(cu_seqlens=cu(0, 32)))),
    ("int32", lambda: (qkv(), dict(cu_seqlens=torch.tensor([0.0, 32.0])))),
    ("int32", lambda: (qkv(), dict(cu_seqlens=cu(0, 32).view(1, 2)))),
    ("start at 0", lambda: (qkv(), dict(cu_seqlens=cu(1, 32)))),
    ("non-decreasing", lambda: (qkv(), dict(cu_seqlens=cu(0, 20, 10, 32)))),
    ("on the CPU or on q's device", lambda: (qkv(), dict(cu_seqlens=cu(0, 32).to("meta")))),
    ("end at", lambda: (qkv(), dict(cu_seqlens=cu(0, 10, 30)))),
    ("cu_seqlens_k", lambda: (qkv(Tq=16), dict(cu_seqlens=cu(0, 16)))),
    ("as many sequences", lambda: (qkv(Tq=16), dict(cu_seqlens=cu(0, 16), cu_seqlens_k=cu(0, 10, 32)))),
    ("more queries", lambda: (qkv(Tq=16), dict(cu_seqlens=cu(0, 12, 16), cu_seqlens_k=cu(0, 10, 32)))),
    ("needs cu_seqlens", lambda: (qkv(), dict(cu_seqlens_k=cu(0, 32)))),
    ("end at", lambda: (qkv(Tq=16), dict(cu_seqlens=cu(0, 16), cu_seqlens_k=cu(0, 31)))),
    ("scale", lambda: (qkv(), dict(scale=float("nan")))),
    ("backend", lambda: (qkv(), dict(backend="cuda"))),
]


@pytest.mark.parametrize("fn", [moba.moba_attention, moba.naive_moba_attention])
@pytest.mark.parametrize("match,make", BAD, ids=[f"{i}-{m}" for i, (m, _) in enumerate(BAD)])
def test_bad_input_raises_value_error(fn, match, make):
    (q, k, v), kw = make()
    kw = {"block_size": 8, "topk": 2, **kw}
    if fn is moba.naive_moba_attention and "backend" in kw:
        pytest.skip("the reference takes no backend")
    with pytest.raises(ValueError, match=match):
        fn(q, k, v, kw.pop("block_size"), kw.pop("topk"), **kw)


def test_select_blocks_validates():
    q, k, _ = qkv()
    with pytest.raises(ValueError, match="topk"):
        moba.select_blocks(q, k, 8, 0)
    with pytest.raises(ValueError, match="multiple"):
        moba.select_blocks(q, torch.randn(1, 32, 3, 16), 8, 2)


def test_triton_backend_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="triton"):
        moba.moba_attention(q, k, v, 8, 2, backend="triton")


def test_gluon_backend_refused_on_cpu_tensors():
    """The Gluon kernels run on sm_90 GPUs only: CPU tensors are refused even under Triton's interpreter (which
    cannot run Gluon), with the argument and the alternative named."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend='gluon' needs"):
        moba.moba_attention(q, k, v, 8, 2, backend="gluon")


@pytest.mark.skipif(not CUDA or GLUON, reason="needs a CUDA GPU on which the Gluon kernels do not run (not sm_90, or "
                                              "another Triton release)")
def test_gluon_backend_refused_on_other_gpus():
    q, k, v = (x.cuda() for x in qkv(dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="backend='gluon' needs a CUDA sm_90 GPU"):
        moba.moba_attention(q, k, v, 8, 2, backend="gluon")


@pytest.mark.parametrize("backend", backends("triton", "gluon"))
def test_kernels_reject_large_head_dim_clearly(backend):
    q, k, v, _ = make_inputs([20], [20], 2, 1, 160, dtype=torch.float32, device=device_of(backend))
    with pytest.raises(ValueError, match="head dims"):
        moba.moba_attention(q, k, v, 8, 2, backend=backend)


@pytest.mark.parametrize("backend", backends("triton", "gluon"))
def test_kernels_reject_fp64(backend):
    q, k, v, _ = make_inputs([20], [20], 2, 1, 16, dtype=torch.float64, device=device_of(backend))
    with pytest.raises(ValueError, match="backend='torch' takes any"):
        moba.moba_attention(q, k, v, 8, 2, backend=backend)


def test_int64_cu_seqlens_accepted():
    q, k, v = qkv()
    out = moba.moba_attention(q, k, v, 8, 2, cu_seqlens=cu(0, 10, 32, dtype=torch.int64))
    assert out.shape == q.shape
