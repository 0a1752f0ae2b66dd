"""Compiled Triton kernels on a CUDA GPU, bf16/fp16, against the fp64 reference (skipped without CUDA).

Tolerance: about twice the error that PyTorch's own low-precision SDPA makes on the dense identity case
(topk covering every block), forward and gradients, plus a small floor.
"""
import pytest
import torch
import torch.nn.functional as F

import moba
from helpers import make_inputs, rel_err, run_with_grads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sdpa(q, k, v, return_lse=False):
    G = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(G, 2).transpose(1, 2),
                                         v.repeat_interleave(G, 2).transpose(1, 2), is_causal=True)
    out = out.transpose(1, 2)
    return (out, torch.zeros(out.shape[:3], device=out.device)) if return_lse else out


def _errors(fn, q, k, v, ref_fn):
    dout = torch.randn(q.shape[:3] + (v.shape[3],), dtype=torch.float64, device=q.device)
    dlse = torch.zeros(q.shape[:3], dtype=torch.float64, device=q.device)
    got = run_with_grads(fn, q, k, v, dout, dlse)
    want = run_with_grads(ref_fn, *(x.double() for x in (q, k, v)), dout, dlse)
    return [rel_err(a, b) for i, (a, b) in enumerate(zip(got, want)) if i != 1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T,Hq,Hkv,D,bs", [(1000, 8, 2, 64, 128), (2048, 4, 4, 128, 256), (777, 6, 3, 80, 64)],
                         ids=lambda x: str(x))
def test_gpu_against_reference(dtype, T, Hq, Hkv, D, bs):
    q, k, v, _ = make_inputs([T], [T], Hq, Hkv, D, dtype=dtype, device="cuda")
    nb = -(-T // bs)
    base = _errors(_sdpa, q, k, v, lambda a, b, c, return_lse: _sdpa(a, b, c, True))
    dense = _errors(lambda a, b, c, return_lse: moba.moba_attention(a, b, c, bs, nb, return_lse=True),
                    q, k, v, lambda a, b, c, return_lse: moba.naive_moba_attention(a, b, c, bs, nb, return_lse=True))
    sparse = _errors(lambda a, b, c, return_lse: moba.moba_attention(a, b, c, bs, 3, return_lse=True),
                     q, k, v, lambda a, b, c, return_lse: moba.naive_moba_attention(a, b, c, bs, 3, return_lse=True))
    for name, e0, e1, e2 in zip(("out", "dq", "dk", "dv"), base, dense, sparse):
        assert e1 <= 2 * e0 + 1e-3, f"{name}: dense-identity error {e1:.2e} vs SDPA {e0:.2e}"
        assert e2 <= 2 * e0 + 1e-3, f"{name}: topk=3 error {e2:.2e} vs SDPA {e0:.2e}"


def test_gpu_varlen_and_decode():
    q, k, v, extra = make_inputs([1, 300, 1, 17], [900, 300, 64, 400], 8, 2, 128, dtype=torch.bfloat16,
                                 device="cuda")
    out = moba.moba_attention(q, k, v, 64, 4, **extra)
    ref = moba.naive_moba_attention(q.double(), k.double(), v.double(), 64, 4, **extra)
    low = moba.naive_moba_attention(q, k, v, 64, 4, **extra)
    assert rel_err(out, ref) <= 2 * rel_err(low, ref) + 1e-3
    # offsets on the host (no device sync): the same result
    host = {name: t.cpu() for name, t in extra.items()}
    assert torch.equal(moba.moba_attention(q, k, v, 64, 4, **host), out)


def test_gpu_deterministic_bitwise():
    q, k, v, _ = make_inputs([3000], [3000], 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    res = []
    for _ in range(2):
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        out = moba.moba_attention(qq, kk, vv, 128, 4, deterministic=True)
        out.float().square().sum().backward()
        res.append((out, qq.grad, kk.grad, vv.grad))   # the forward's entry order varies (atomics): not its result
    for a, b in zip(*res):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("lens_q,lens_k,Hq,Hkv,D,bs,topk,det", [
    ([1000], [1000], 8, 2, 64, 128, 3, False),
    ([2048], [2048], 4, 4, 128, 256, 3, False),
    ([3001], [3001], 8, 2, 128, 128, 5, False),                  # ragged tail, several row tiles per block
    ([700, 1, 1500, 90], [700, 1, 1500, 90], 6, 3, 128, 64, 4, False),   # packed, uneven, odd heads
    ([300, 17, 1], [900, 400, 64], 8, 2, 128, 64, 4, False),     # fewer queries than keys (chunked prefill)
    ([1500, 90], [1500, 90], 8, 2, 128, 128, 3, True),           # deterministic (stable-sorted entries)
], ids=lambda x: str(x))
def test_gpu_gluon_dkdv(monkeypatch, dtype, lens_q, lens_k, Hq, Hkv, D, bs, topk, det):
    """The Gluon dK/dV kernel (on by default on sm_90): gradients within the Triton kernel's error against
    the fp64 reference."""
    from moba.ops import gluon_dkdv, parallel
    q, k, v, extra = make_inputs(lens_q, lens_k, Hq, Hkv, D, dtype=dtype, device="cuda")
    if not gluon_dkdv.usable(q, D, D, 128):
        pytest.skip("the Gluon kernel needs sm_90")
    dout = torch.randn(q.shape[:3] + (D,), dtype=torch.float64, device=q.device)
    dlse = torch.zeros(q.shape[:3], dtype=torch.float64, device=q.device)

    def grads(flag):
        monkeypatch.setattr(parallel, "DKDV_GLUON", flag)
        return run_with_grads(lambda a, b, c, return_lse: moba.moba_attention(
            a, b, c, bs, topk, return_lse=True, deterministic=det, **extra), q, k, v, dout, dlse)
    ref = run_with_grads(lambda a, b, c, return_lse: moba.naive_moba_attention(a, b, c, bs, topk, return_lse=True,
                                                                               **extra),
                         *(x.double() for x in (q, k, v)), dout, dlse)
    tri, glu = grads("0"), grads("1")
    for i, name in ((3, "dk"), (4, "dv")):
        assert torch.isfinite(glu[i]).all(), name
        assert rel_err(glu[i], ref[i]) <= 1.2 * rel_err(tri[i], ref[i]) + 1e-3, name
    if det:
        again = grads("1")
        assert torch.equal(again[3], glu[3]) and torch.equal(again[4], glu[4])


def test_gpu_gluon_dkdv_skips_unaligned_rows():
    """Rows the Gluon kernel's 16-byte copies cannot take (a head stride of 132 elements) go to the Triton
    kernel: still the reference's gradients."""
    from moba.ops import gluon_dkdv
    q, k, v, _ = make_inputs([1000], [1000], 8, 2, 132, dtype=torch.bfloat16, device="cuda")
    q, k, v = (x[..., :128] for x in (q, k, v))
    assert not gluon_dkdv.usable(q[0], 128, 128, 128, k[0], v[0])
    got = _errors(lambda a, b, c, return_lse: moba.moba_attention(a, b, c, 128, 3, return_lse=True), q, k, v,
                  lambda a, b, c, return_lse: moba.naive_moba_attention(a, b, c, 128, 3, return_lse=True))
    assert max(got) < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("lens_q,lens_k,Hq,Hkv,D,bs,topk", [
    ([3001], [3001], 8, 2, 128, 128, 5),                 # ragged tail
    ([700, 1, 1500, 90], [700, 1, 1500, 90], 6, 3, 64, 96, 4),   # packed; block not a multiple of 128
    ([300, 17, 1], [900, 400, 64], 8, 2, 128, 64, 4),     # Tq < Tk; blocks shorter than a key tile
    ([4000], [4000], 4, 4, 128, 448, 8),                 # 3.5 key tiles per block
], ids=lambda x: str(x))
@pytest.mark.parametrize("persist,own,pf,sst,qe,og", [
    ("1", "1", "1", "1", "1", "0"), ("1", "1", "1", "1", "1", "1"), ("1", "0", "1", "0", "0", "0"),
    ("1", "0", "1", "1", "0", "0"), ("1", "0", "1", "1", "1", "0"), ("1", "0", "0", "0", "0", "0"),
    ("0", "0", "0", "0", "0", "0")],
    ids=["persistent_own", "persistent_own_gate", "persistent_pf", "persistent_sst", "persistent_qe", "persistent",
         "per_tile"])
def test_gpu_gluon_fwd_ws(monkeypatch, persist, own, pf, sst, qe, og, dtype, lens_q, lens_k, Hq, Hkv, D, bs, topk):
    """The warp-specialized Gluon forward of the chosen blocks (on by default on sm_90 for blocks of 128 keys
    or more; forced here for every block size), in both forms, with the own block by `_own_fwd` or by its Gluon
    twin (`own_fwd_ws_persistent_kernel`), with and without the persistent consumers' prefetch (PF), staged
    stores (SST) and early Q copies (QE), and with the gate inside the own-block kernel (GLUON_OWN_GATE): the fp64
    reference's output and log-sum-exp within the Triton
    kernels' error (outputs NaN-poisoned), the gradients through it within the reference's tolerance, and the
    persistent form bitwise equal to the one-program-per-tile form."""
    from moba.ops import gluon_dkdv, gluon_fwd_ws, parallel
    monkeypatch.setattr(parallel, "GLUON_WS_PERSIST", persist)
    monkeypatch.setattr(parallel, "GLUON_OWN", own)
    monkeypatch.setattr(parallel, "GLUON_WS_PF", pf)
    monkeypatch.setattr(parallel, "GLUON_WS_SST", sst)
    monkeypatch.setattr(parallel, "GLUON_WS_QE", qe)
    monkeypatch.setattr(parallel, "GLUON_OWN_QE", qe)      # the own block's early Q copies too (GLUON_OWN)
    monkeypatch.setattr(parallel, "GLUON_OWN_GATE", og)
    q, k, v, extra = make_inputs(lens_q, lens_k, Hq, Hkv, D, dtype=dtype, device="cuda")
    if not (gluon_dkdv.usable(q, D, D, 128) and gluon_fwd_ws.usable(k[0], v[0])):
        pytest.skip("the Gluon kernels need sm_90")
    ref, ref_lse = moba.naive_moba_attention(q.double(), k.double(), v.double(), bs, topk, return_lse=True, **extra)
    monkeypatch.setattr(parallel, "FWD_GLUON", "0")
    tri, tri_lse = moba.moba_attention(q, k, v, bs, topk, return_lse=True, **extra)
    monkeypatch.setattr(parallel, "FWD_GLUON", "all")   # blocks under 128 keys too
    glu, glu_lse = moba.moba_attention(q, k, v, bs, topk, return_lse=True, **extra)
    assert torch.isfinite(glu).all() and torch.isfinite(glu_lse).all()
    assert rel_err(glu, ref) <= 1.2 * rel_err(tri, ref) + 1e-3
    assert rel_err(glu_lse, ref_lse) <= 1.2 * rel_err(tri_lse, ref_lse) + 1e-4
    got = _errors(lambda a, b, c, return_lse: moba.moba_attention(a, b, c, bs, topk, return_lse=True, **extra),
                  q, k, v, lambda a, b, c, return_lse: moba.naive_moba_attention(a, b, c, bs, topk, return_lse=True,
                                                                                 **extra))
    assert max(got) < 2e-2, got
    if persist == "1" and own == "0":
        monkeypatch.setattr(parallel, "GLUON_WS_PERSIST", "0")
        one, one_lse = moba.moba_attention(q, k, v, bs, topk, return_lse=True, **extra)
        assert torch.equal(glu, one) and torch.equal(glu_lse, one_lse)


@pytest.mark.parametrize("lens_q,lens_k,bs,topk", [([2500], [2500], 256, 1), ([100, 333], [1000, 333], 128, 1),
                                                   ([5000], [5000], 512, 3)], ids=lambda x: str(x))
@pytest.mark.parametrize("sst,qe", [("0", "0"), ("1", "0"), ("1", "1")], ids=["own", "own_sst", "own_qe"])
def test_gpu_gluon_own_block(monkeypatch, lens_q, lens_k, bs, topk, sst, qe):
    """The own block by the Gluon kernel (GLUON_OWN): block-local attention (topk 1: nothing else runs) with a
    ragged tail, Tq < Tk with unaligned query tiles, and the fwd8k shape's blocks; fp64 reference within the
    Triton kernel's error; with and without its staged stores (SST) and early Q copies (QE)."""
    from moba.ops import gluon_dkdv, gluon_fwd_ws, parallel
    monkeypatch.setattr(parallel, "GLUON_OWN_SST", sst)
    monkeypatch.setattr(parallel, "GLUON_OWN_QE", qe)
    q, k, v, extra = make_inputs(lens_q, lens_k, 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    if not (gluon_dkdv.usable(q, 128, 128, 128) and gluon_fwd_ws.usable(k[0], v[0])):
        pytest.skip("the Gluon kernels need sm_90")
    ref, ref_lse = moba.naive_moba_attention(q.double(), k.double(), v.double(), bs, topk, return_lse=True, **extra)
    monkeypatch.setattr(parallel, "GLUON_OWN", "0")
    tri, tri_lse = moba.moba_attention(q, k, v, bs, topk, return_lse=True, **extra)
    monkeypatch.setattr(parallel, "GLUON_OWN", "1")
    glu, glu_lse = moba.moba_attention(q, k, v, bs, topk, return_lse=True, **extra)
    assert torch.isfinite(glu).all() and torch.isfinite(glu_lse).all()
    assert rel_err(glu, ref) <= 1.2 * rel_err(tri, ref) + 1e-3
    assert rel_err(glu_lse, ref_lse) <= 1.2 * rel_err(tri_lse, ref_lse) + 1e-4


def test_gpu_forward_captures_in_a_cuda_graph():
    """The forward has no host synchronisation: captured in a CUDA graph (`moba.bench.cuda_graph`), its replay
    on new inputs (copied into the captured tensors) equals an eager call on them bitwise.
    (benchmarks/host_profile.py made the same capture on an H100.)"""
    from moba.bench import cuda_graph
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3000, h, 128, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
    replay, out = cuda_graph(lambda: moba.moba_attention(q, k, v, 256, 3), warmup=2)
    for x in (q, k, v):
        x.copy_(torch.randn_like(x))
    replay()
    torch.cuda.synchronize()
    want = moba.moba_attention(q, k, v, 256, 3)
    assert torch.isfinite(out).all()
    assert torch.equal(out, want)


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
def test_gpu_forward_backward_captures_in_a_cuda_graph(deterministic):
    """A training step's attention (forward and backward) captured in a CUDA graph replays on new inputs to the
    eager gradients: bitwise with ``deterministic=True``, to the atomics' rounding otherwise."""
    from moba.bench import cuda_graph
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3000, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (8, 2, 2))

    def step():
        for x in (q, k, v):
            x.grad = None
        moba.moba_attention(q, k, v, 256, 3, deterministic=deterministic).float().square().sum().backward()
        return q.grad, k.grad, v.grad

    replay, grads = cuda_graph(step, warmup=2)
    with torch.no_grad():
        for x in (q, k, v):
            x.copy_(torch.randn_like(x))
    replay()
    torch.cuda.synchronize()
    got = [g.clone() for g in grads]
    want = step()
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        if deterministic:
            assert torch.equal(a, b)
        else:
            assert rel_err(a, b) < 1e-2



def test_gpu_bench_graph_rows():
    """`moba bench --graph` on a GPU: eager and CUDA-graph times of each dense variant and of MoBA, the speedups
    from them, the table's graph columns, and MoBA's output against the fp64 reference."""
    import math
    from moba import bench
    rows = bench.run([2048], 256, 3, 8, 2, 128, "bfloat16", "auto", "cuda", repeats=1, graph=True)
    r = rows[0]
    g = [r[f"{n}_graph_ms"] for n in ("cudnn", "flash") if not math.isnan(r[f"{n}_graph_ms"])]
    assert g and all(x > 0 for x in g) and r["dense_graph_ms"] == min(g)
    assert r["moba_graph_ms"] > 0 and r["speedup_graph"] == pytest.approx(r["dense_graph_ms"] / r["moba_graph_ms"])
    assert r["rel_err"] < 2e-2
    head = bench.format_table(rows).splitlines()[0]
    assert "cudnn graph ms" in head and "moba graph ms" in head and "speedup (graphs)" in head
