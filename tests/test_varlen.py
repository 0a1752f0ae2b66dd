"""Packed sequences of uneven lengths (cu_seqlens) and fewer queries than keys (chunked prefill, decoding rows), on
every backend this machine runs, against the fp64 reference: forward, log-sum-exp and gradients."""
import pytest
import torch

import moba
from helpers import VARLEN, backends, check_shape, make_inputs, needs_cuda, rel_err


@pytest.mark.parametrize("backend", backends("torch", "triton", "gluon"))
@pytest.mark.parametrize("lens_q,lens_k,Hq,Hkv,D,bs,topk", VARLEN.values(), ids=VARLEN.keys())
def test_matches_reference(backend, lens_q, lens_k, Hq, Hkv, D, bs, topk):
    check_shape(backend, lens_q, lens_k, Hq, Hkv, D, bs, topk)


@needs_cuda
@pytest.mark.parametrize("backend", backends("triton", "gluon"))
def test_cuda_varlen_and_decode(backend):
    """bf16, head dim 128: single decoding rows and a longer chunk beside them, within twice the reference's own
    rounding; offsets on the host (no device sync) give the same result."""
    q, k, v, extra = make_inputs([1, 300, 1, 17], [900, 300, 64, 400], 8, 2, 128, dtype=torch.bfloat16,
                                 device="cuda")
    out = moba.moba_attention(q, k, v, 64, 4, backend=backend, **extra)
    ref = moba.naive_moba_attention(q.double(), k.double(), v.double(), 64, 4, **extra)
    low = moba.naive_moba_attention(q, k, v, 64, 4, **extra)
    assert rel_err(out, ref) <= 2 * rel_err(low, ref) + 1e-3
    host = {name: t.cpu() for name, t in extra.items()}
    assert torch.equal(moba.moba_attention(q, k, v, 64, 4, backend=backend, **host), out)
