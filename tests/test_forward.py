"""moba_attention against the fp64 reference on every backend this machine runs: one batch or one sequence of
awkward shapes, MoBA's identities, dtypes and strided inputs, the choice of backend, and the Triton forward's query
chunks and tile sizes (packed sequences and fewer queries than keys: test_varlen.py).

On a CUDA GPU: bf16/fp16 at larger sizes, with a tolerance of about twice the error that PyTorch's own
low-precision SDPA makes on the dense identity case (topk covering every block), forward and gradients, plus a
small floor; and the Gluon forward against the Triton one.
"""
import pytest
import torch
import torch.nn.functional as F

import moba
from helpers import (CUDA, GLUON, SHAPES, TRITON, backend_dtypes, backends, check_against_reference,
                     check_shape, device_of, errors, make_inputs, moba_fn, naive_fn, needs_cuda,
                     needs_gluon, needs_triton, rel_err)


@pytest.mark.parametrize("backend", backends("torch", "triton", "gluon"))
@pytest.mark.parametrize("lens_q,lens_k,Hq,Hkv,D,bs,topk", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(backend, lens_q, lens_k, Hq, Hkv, D, bs, topk):
    check_shape(backend, lens_q, lens_k, Hq, Hkv, D, bs, topk)


def _identity_inputs(backend, *shape):
    """fp64 for the torch backend and the reference (compared to 1e-10), fp32 for the kernels (to 2e-4)."""
    kernel = backend in ("triton", "gluon")
    q, k, v, _ = make_inputs(*shape, dtype=torch.float32 if kernel else torch.float64, device=device_of(backend))
    return q, k, v, (2e-4 if kernel else 1e-10)


def _causal(q, k, v, scale=None):
    G = q.shape[2] // k.shape[2]
    kr, vr = (x.repeat_interleave(G, 2).transpose(1, 2) for x in (k, v))
    Tq, Tk = q.shape[1], k.shape[1]
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    return F.scaled_dot_product_attention(q.transpose(1, 2), kr, vr, attn_mask=mask, scale=scale).transpose(1, 2)


def _close(out, want, tol):
    if tol < 1e-6:
        torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    else:
        assert rel_err(out, want) < tol


@pytest.mark.parametrize("backend", backends())
def test_topk_covering_all_blocks_is_causal_attention(backend):
    q, k, v, tol = _identity_inputs(backend, [97, 97], [97, 97], 4, 2, 16)
    out = moba.moba_attention(q, k, v, 16, 7, backend=backend, scale=0.2)
    _close(out, _causal(q, k, v, scale=0.2), tol)
    q, k, v, tol = _identity_inputs(backend, [20], [90], 4, 2, 16)
    out = moba.moba_attention(q, k, v, 8, 100, backend=backend)
    _close(out, _causal(q, k, v), tol)


@pytest.mark.parametrize("backend", backends())
def test_topk_one_is_block_local_causal(backend):
    bs = 16
    q, k, v, tol = _identity_inputs(backend, [100], [100], 2, 1, 16)
    out = moba.moba_attention(q, k, v, bs, 1, backend=backend)
    blk = torch.arange(100, device=q.device) // bs
    mask = (blk[:, None] == blk[None, :]) & torch.ones(100, 100, dtype=torch.bool, device=q.device).tril()
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2),
                                          v.repeat_interleave(2, 2).transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)
    _close(out, want, tol)


@pytest.mark.parametrize("backend", backends())
def test_small_topk_differs_from_dense(backend):
    q, k, v, tol = _identity_inputs(backend, [128], [128], 2, 2, 16)
    out = moba.moba_attention(q, k, v, 16, 2, backend=backend)
    dense = _causal(q, k, v)
    assert (out - dense).abs().max() > 1e-2
    # but the first two blocks read everything there is
    _close(out[:, :32], dense[:, :32], tol)


def test_auto_backend_runs_on_cpu():
    q, k, v, _ = make_inputs([50], [50], 2, 2, 16, dtype=torch.float32)
    out = moba.moba_attention(q, k, v, 8, 2)
    assert rel_err(out, moba.naive_moba_attention(q, k, v, 8, 2)) < 1e-5


def test_auto_backend_choice():
    """"auto" takes the torch backend on the CPU (never Triton's interpreter) and for inputs the kernels do not take
    (fp64, head dims over 128); on CUDA the Gluon kernels where they run (sm_90 with their Triton), else Triton."""
    from moba.api import resolve_backend
    assert resolve_backend("auto", torch.empty(1, 1, 2, 16)) == "torch"
    if CUDA and TRITON:
        x = torch.empty(1, 1, 2, 16, device="cuda")
        assert resolve_backend("auto", x) == ("gluon" if GLUON else "triton")
        assert resolve_backend("auto", x.double()) == "torch"
        assert resolve_backend("auto", torch.empty(1, 1, 2, 160, device="cuda")) == "torch"


@pytest.mark.parametrize("backend", backends("torch", "triton", "gluon"))
def test_fp32_and_noncontiguous(backend):
    tol = 2e-4 if backend in ("triton", "gluon") else 1e-5
    dev = device_of(backend)
    # transformers hands [B, H, T, D] tensors transposed to [B, T, H, D]: not contiguous
    q = torch.randn(2, 4, 90, 32, device=dev).transpose(1, 2)
    k = torch.randn(2, 2, 90, 32, device=dev).transpose(1, 2)
    v = torch.randn(2, 2, 90, 32, device=dev).transpose(1, 2)
    assert not q.is_contiguous()
    check_against_reference(q, k, v, 16, 3, backend, tol, {})
    # slices of a fused projection's output (strided heads and rows): packing keeps them views
    x, y = torch.randn(1, 100, 4, 96, device=dev), torch.randn(1, 100, 2, 64, device=dev)
    check_against_reference(x[..., :32], y[..., :32], y[..., 32:], 16, 3, backend, tol, {})


@pytest.mark.parametrize("backend,dtype", backend_dtypes((torch.float32, torch.bfloat16, torch.float16),
                                                         "torch", "triton", "gluon"))
def test_transposed_inputs(backend, dtype):
    """q, k, v transposed from [B, H, T, D] (as attention modules hold them): T and H do not fold into one dimension;
    the backends read them in place whatever their dtype (the CPU forward once failed here with a view error for
    bf16/fp16)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 150, 32, generator=g).to(dtype).transpose(1, 2).to(device_of(backend))
               for h in (4, 2, 2))
    assert not q.is_contiguous()
    out = moba.moba_attention(q, k, v, 16, 3, backend=backend)
    ref = moba.naive_moba_attention(q.double(), k.double(), v.double(), 16, 3)
    low = moba.naive_moba_attention(q, k, v, 16, 3)
    if backend in ("triton", "gluon") and dtype == torch.float32:
        assert rel_err(out, ref) < 2e-4            # TF32-free fp32 kernels: their usual bound
    else:
        assert rel_err(out, ref) <= 2 * rel_err(low, ref) + (1e-3 if dtype != torch.float32 else 1e-6)


@pytest.mark.parametrize("backend,dtype", backend_dtypes((torch.float16, torch.bfloat16), "torch", "triton", "gluon"))
def test_half_within_twice_the_references_own_rounding(backend, dtype):
    q, k, v, extra = make_inputs([70, 58], [70, 58], 4, 2, 32, dtype=dtype, device=device_of(backend))
    cu = extra["cu_seqlens"]
    ref = moba.naive_moba_attention(q.double(), k.double(), v.double(), 16, 3, cu_seqlens=cu)
    low = moba.naive_moba_attention(q, k, v, 16, 3, cu_seqlens=cu)
    out = moba.moba_attention(q, k, v, 16, 3, cu_seqlens=cu, backend=backend)
    assert out.dtype == dtype
    assert rel_err(out, ref) <= 2 * rel_err(low, ref) + 1e-4


@pytest.mark.parametrize("backend", backends("torch", "triton", "gluon"))
def test_different_dv_and_scale(backend):
    q, k, v, extra = make_inputs([50], [50], 2, 1, 16, Dv=32, dtype=torch.float32, device=device_of(backend))
    out, lse = moba.moba_attention(q, k, v, 8, 3, scale=0.11, return_lse=True, backend=backend)
    r_out, r_lse = moba.naive_moba_attention(q.double(), k.double(), v.double(), 8, 3, scale=0.11,
                                             return_lse=True)
    assert rel_err(out, r_out) < 2e-4 and rel_err(lse, r_lse) < 2e-4


# --- the Triton forward's query chunks and tile sizes ---

@pytest.mark.parametrize("backend", backends("triton", "gluon"))
def test_inference_in_several_query_chunks(backend, monkeypatch):
    """Force tiny selection chunks: the forward must give the same answer chunk by chunk."""
    from moba.triton import fwd
    monkeypatch.setattr(fwd, "SELECT_BYTES", 1)
    monkeypatch.setattr(fwd, "FILL_BYTES", 0)        # no minimum of rows per chunk either
    q, k, v, extra = make_inputs([150, 70], [150, 70], 2, 1, 16, dtype=torch.float32, device=device_of(backend))
    ref = moba.naive_moba_attention(q.double(), k.double(), v.double(), 16, 3, **extra)
    with torch.no_grad():
        out = moba.moba_attention(q, k, v, 16, 3, backend=backend, **extra)
    assert rel_err(out, ref) < 2e-4
    check_against_reference(q, k, v, 16, 3, backend, 2e-4, extra)


@needs_triton
def test_forward_chunks_with_a_backward_to_come():
    """The forward's query chunks: a training shape at 8K with blocks of 128 (4 x 8192 rows, 8 / 2 heads, D 64,
    11 slots) runs in one chunk when its selection is kept for a backward (in several, each with 11 launches, a
    training step is bound by the host's launch work), in several without one; the chunks' entry ids stay within
    q's size / KEEP_SHARE."""
    from moba.triton import fwd
    T, Hq, Hkv, S, NB, D = 32768, 8, 2, 11, 256, 64
    q_bytes = T * Hq * D * 2
    assert fwd._chunk_rows(T, Hq, Hkv, S, NB, 128, q_bytes, keep=True) == T
    rows = fwd._chunk_rows(T, Hq, Hkv, S, NB, 128, q_bytes, keep=False)
    assert rows % 128 == 0 and rows < T and rows * Hq * S * 8 <= fwd.SELECT_BYTES
    # a benchmark shape (524288 rows, 32 / 8 heads, D 128, blocks of 128, topk 8)
    T, Hq, Hkv, S, NB, D = 524288, 32, 8, 7, 4096, 128
    q_bytes = T * Hq * D * 2
    rows = fwd._chunk_rows(T, Hq, Hkv, S, NB, 128, q_bytes, keep=True)
    assert rows == T and rows * Hq * S * 4 <= q_bytes // fwd.KEEP_SHARE
    rows = fwd._chunk_rows(T, Hq, Hkv, S, NB, 128, q_bytes, keep=False)
    assert rows < T and rows * Hq * S * 8 <= q_bytes // fwd.SELECT_SHARE


@pytest.mark.parametrize("backend", backends("triton", "gluon"))
@pytest.mark.parametrize("cfg", [
    {"gate": (32, 16, 4, 1), "fwd": (16, 32, 4, 1), "own": (64, 16, 4, 1),
     "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1), "own_dq": (16, 64, 4, 1)},
    {"gate": (16, 16, 4, 1), "fwd": (64, 16, 4, 1), "own": (16, 32, 4, 1),
     "dkdv": (64, 16, 4, 1), "dq": (16, 32, 4, 1), "own_dq": (32, 16, 4, 1)},
], ids=["cfg_a", "cfg_b"])
def test_each_kernel_with_its_own_tile_sizes(backend, cfg, monkeypatch):
    """Every kernel kind takes its own (BM, BN): tile lists of different row counts must not mix."""
    from moba.triton import configs, fwd
    for kind, tiles in cfg.items():
        monkeypatch.setitem(configs.CONFIG, kind, tiles)
    monkeypatch.setattr(fwd, "SELECT_BYTES", 1)       # several query chunks, cut at 128 rows
    monkeypatch.setattr(fwd, "FILL_BYTES", 0)
    q, k, v, extra = make_inputs([150, 1, 200], [150, 9, 200], 4, 2, 16, dtype=torch.float32,
                                 device=device_of(backend))
    check_against_reference(q, k, v, 16, 3, backend, 2e-4, extra)


# --- CUDA: bf16/fp16 at larger sizes; the Gluon forward ---

def _sdpa(q, k, v, return_lse=False):
    G = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(G, 2).transpose(1, 2),
                                         v.repeat_interleave(G, 2).transpose(1, 2), is_causal=True)
    out = out.transpose(1, 2)
    return (out, torch.zeros(out.shape[:3], device=out.device)) if return_lse else out


@needs_cuda
@pytest.mark.parametrize("backend", backends("triton", "gluon"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T,Hq,Hkv,D,bs", [(1000, 8, 2, 64, 128), (2048, 4, 4, 128, 256), (777, 6, 3, 80, 64)],
                         ids=["T1000-D64-gqa4", "T2048-D128", "T777-D80-gqa2"])
def test_cuda_against_reference(backend, dtype, T, Hq, Hkv, D, bs):
    q, k, v, _ = make_inputs([T], [T], Hq, Hkv, D, dtype=dtype, device="cuda")
    nb = -(-T // bs)
    base = errors(_sdpa, q, k, v, lambda a, b, c, return_lse: _sdpa(a, b, c, True))
    dense = errors(moba_fn(bs, nb, backend), q, k, v, naive_fn(bs, nb))
    sparse = errors(moba_fn(bs, 3, backend), q, k, v, naive_fn(bs, 3))
    for name, e0, e1, e2 in zip(("out", "dq", "dk", "dv"), base, dense, sparse):
        assert e1 <= 2 * e0 + 1e-3, f"{name}: dense-identity error {e1:.2e} vs SDPA {e0:.2e}"
        assert e2 <= 2 * e0 + 1e-3, f"{name}: topk=3 error {e2:.2e} vs SDPA {e0:.2e}"


def _several_chunks(monkeypatch):
    """Query chunks of 128 rows whether or not a backward is to come: the gate then runs on its own (Triton), not
    inside the Gluon own-block kernel (which takes it only for a forward in one chunk)."""
    from moba.triton import fwd
    for name, value in (("SELECT_BYTES", 1), ("FILL_BYTES", 0), ("SELECT_SHARE", 1 << 40), ("KEEP_SHARE", 1 << 40)):
        monkeypatch.setattr(fwd, name, value)


def _gluon_within_triton_error(q, k, v, bs, topk, extra):
    """The "gluon" backend's output and log-sum-exp against the fp64 reference, within the Triton kernels' error."""
    ref, ref_lse = moba.naive_moba_attention(q.double(), k.double(), v.double(), bs, topk, return_lse=True, **extra)
    tri, tri_lse = moba.moba_attention(q, k, v, bs, topk, return_lse=True, backend="triton", **extra)
    glu, glu_lse = moba.moba_attention(q, k, v, bs, topk, return_lse=True, backend="gluon", **extra)
    assert torch.isfinite(glu).all() and torch.isfinite(glu_lse).all()
    assert rel_err(glu, ref) <= 1.2 * rel_err(tri, ref) + 1e-3
    assert rel_err(glu_lse, ref_lse) <= 1.2 * rel_err(tri_lse, ref_lse) + 1e-4


@needs_gluon
@pytest.mark.parametrize("gate", ["in_own_kernel", "triton_gate"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("lens_q,lens_k,Hq,Hkv,D,bs,topk", [
    ([3001], [3001], 8, 2, 128, 128, 5),                 # ragged tail
    ([700, 1, 1500, 90], [700, 1, 1500, 90], 6, 3, 64, 96, 4),   # packed; block not a multiple of 128
    ([300, 17, 1], [900, 400, 64], 8, 2, 128, 64, 4),     # Tq < Tk; blocks shorter than a key tile
    ([4000], [4000], 4, 4, 128, 448, 8),                 # 3.5 key tiles per block
], ids=["T3001-ragged", "packed-block96", "Tq-under-Tk-block64", "block448"])
def test_gluon_forward(monkeypatch, gate, dtype, lens_q, lens_k, Hq, Hkv, D, bs, topk):
    """The warp-specialized Gluon forward (own block and chosen blocks; the "gluon" backend runs it for blocks of
    128 keys or more, the Triton forward for smaller ones), with the gate inside the own-block kernel (one query
    chunk) or on its own (several): the fp64 reference's output and log-sum-exp within the Triton kernels' error
    (outputs NaN-poisoned), and the gradients through it within the reference's tolerance."""
    if gate == "triton_gate":
        _several_chunks(monkeypatch)
    q, k, v, extra = make_inputs(lens_q, lens_k, Hq, Hkv, D, dtype=dtype, device="cuda")
    _gluon_within_triton_error(q, k, v, bs, topk, extra)
    got = errors(moba_fn(bs, topk, "gluon", **extra), q, k, v, naive_fn(bs, topk, **extra))
    assert max(got) < 2e-2, got


@needs_gluon
@pytest.mark.parametrize("lens_q,lens_k,bs,topk", [([2500], [2500], 256, 1), ([100, 333], [1000, 333], 128, 1),
                                                   ([5000], [5000], 512, 3)],
                         ids=["block-local-ragged", "Tq-under-Tk-unaligned-tiles", "T5000-block512"])
def test_gluon_own_block(lens_q, lens_k, bs, topk):
    """The own block by the Gluon kernel: block-local attention (topk 1: nothing else runs) with a ragged tail,
    Tq < Tk with unaligned query tiles, and blocks of 512 with chosen ones too; fp64 reference within the Triton
    kernel's error."""
    q, k, v, extra = make_inputs(lens_q, lens_k, 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    _gluon_within_triton_error(q, k, v, bs, topk, extra)
