"""Decoding (queries fewer than keys) with the incremental block-means cache."""
import pytest
import torch

import moba
from helpers import make_inputs, rel_err
from moba.ops import gate
from moba.ops.utils import pack, validate


def test_block_means_cache_matches_pooling():
    torch.manual_seed(0)
    k = torch.randn(1, 100, 2, 16)
    cache = moba.BlockMeansCache()
    for T in (1, 7, 8, 9, 33, 64, 65, 100):
        got = cache.means(pack(k[:, :T]), 8)
        lay, _ = validate(k[:, :T], k[:, :T], k[:, :T], 8, 2)
        want = gate.block_means(pack(k[:, :T]), lay, lay.tensors("cpu"))
        full = T // 8
        assert got.shape == want.shape
        torch.testing.assert_close(got[:full], want[:full])
    assert cache.n_keys == 100
    cache.means(pack(k[:, :20]), 8)          # a shorter cache is a new sequence: reset
    assert cache.n_keys == 20


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_by_token_decoding_equals_whole_sequence(backend):
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, _ = make_inputs([75], [75], 4, 2, 16, dtype=torch.float32, device=dev)
    whole = moba.moba_attention(q, k, v, 8, 3, backend=backend)
    cache = moba.BlockMeansCache()
    n = 30
    outs = [moba.moba_attention(q[:, :n], k[:, :n], v[:, :n], 8, 3, backend=backend, means_cache=cache)]
    for t in range(n, 75):
        outs.append(moba.moba_attention(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], 8, 3, backend=backend,
                                        means_cache=cache))
    assert rel_err(torch.cat(outs, 1), whole) < 1e-5


def test_chunked_prefill_with_cache_matches_reference():
    q, k, v, _ = make_inputs([100], [100], 2, 1, 16)
    ref = moba.naive_moba_attention(q, k, v, 16, 3)
    cache = moba.BlockMeansCache()
    outs = [moba.moba_attention(q[:, a:a + 25], k[:, :a + 25], v[:, :a + 25], 16, 3, means_cache=cache)
            for a in range(0, 100, 25)]
    assert rel_err(torch.cat(outs, 1), ref) < 1e-10


def test_means_cache_needs_one_sequence():
    q, k, v, _ = make_inputs([10, 10], [10, 10], 2, 1, 16)
    with pytest.raises(ValueError, match="means_cache"):
        moba.moba_attention(q, k, v, 4, 2, means_cache=moba.BlockMeansCache())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (6, 3), (8, 1)], ids=["G2", "odd-heads", "G8"])
@pytest.mark.parametrize("chunk", [512, 8], ids=["block-per-item", "block-split"])
def test_decode_kernel_matches_reference(dtype, Hq, Hkv, chunk, monkeypatch):
    """The one-launch decode kernel (one query per sequence, no gradient) against the fp64 reference;
    with chunk 8 each 16-key block is read by two programs."""
    pytest.importorskip("triton")
    from moba.ops import decode
    monkeypatch.setattr(decode, "ENABLED_ON_CUDA", True)
    monkeypatch.setattr(decode, "CHUNK", chunk)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lens_k = [75, 1, 200, 33]
    q, k, v, extra = make_inputs([1] * 4, lens_k, Hq, Hkv, 16, Dv=32, dtype=dtype, device=dev)
    ref = moba.naive_moba_attention(q.double(), k.double(), v.double(), 16, 4, return_lse=True, **extra)
    low = moba.naive_moba_attention(q, k, v, 16, 4, **extra)
    calls = []
    real = decode.decode
    decode.decode = lambda *a, **kw: (calls.append(1), real(*a, **kw))[1]
    try:
        with torch.no_grad():
            out, lse = moba.moba_attention(q, k, v, 16, 4, backend="triton", return_lse=True, **extra)
    finally:
        decode.decode = real
    assert calls == [1]
    tol = 2e-4 if dtype == torch.float32 else 2 * rel_err(low, ref[0]) + 1e-3
    assert rel_err(out, ref[0]) < tol and rel_err(lse, ref[1]) < 2e-4 + (0 if dtype == torch.float32 else 1e-3)
