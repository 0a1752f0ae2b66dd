"""The "torch" backend (and select_blocks) against the fp64 reference, plus MoBA's identities."""
import pytest
import torch
import torch.nn.functional as F

import moba
from moba.ops import grouped
from helpers import check_against_reference, make_inputs, rel_err

CASES = [
    # lens_q, lens_k, Hq, Hkv, D, block, topk
    ([100], [100], 4, 4, 48, 16, 3),          # T not a multiple of the block
    ([10], [10], 2, 1, 16, 16, 3),            # T < block
    ([1], [1], 2, 2, 16, 8, 2),               # T = 1
    ([130, 130], [130, 130], 6, 3, 80, 32, 2),  # batch of 2, head dim 80, GQA 2
    ([77], [77], 8, 2, 32, 8, 4),             # GQA 4
    ([40, 1, 67, 13], [40, 1, 67, 13], 4, 2, 16, 8, 3),   # packed, uneven, with a length-1 sequence
    ([16], [100], 4, 2, 16, 16, 3),           # chunked prefill: Tq < Tk
    ([1], [150], 4, 1, 16, 16, 4),            # decoding: Tq = 1
    ([5, 1, 20], [50, 9, 20], 3, 3, 16, 8, 2),  # varlen with Tq < Tk per sequence
    ([64], [64], 2, 2, 16, 16, 1),            # topk 1: own block only
    ([0, 30], [12, 30], 2, 1, 8, 4, 3),       # an empty query sequence
]


@pytest.mark.parametrize("lens_q,lens_k,Hq,Hkv,D,bs,topk", CASES, ids=lambda x: str(x))
def test_torch_backend_matches_reference(lens_q, lens_k, Hq, Hkv, D, bs, topk):
    q, k, v, extra = make_inputs(lens_q, lens_k, Hq, Hkv, D, Dv=D + 8)
    check_against_reference(q, k, v, bs, topk, "torch", 1e-10, extra)


def check_out_only_grads(q, k, v, bs, topk, extra):
    """The torch backend's output and gradients through the output alone (no lse gradient) against the reference."""
    dout = torch.randn(q.shape[:3] + (v.shape[3],), dtype=torch.float64)
    got, want = ([x.detach().clone().requires_grad_() for x in (q, k, v)] for _ in range(2))
    out = moba.moba_attention(*got, bs, topk, backend="torch", **extra)
    ref = moba.naive_moba_attention(*want, bs, topk, **extra)
    out.backward(dout)
    ref.backward(dout)
    for a, b in zip([out] + [x.grad for x in got], [ref] + [x.grad for x in want]):
        assert not a.isnan().any() and (a - b).norm() <= 1e-10 * b.norm() + 1e-12    # dq, dk are 0 at T = 1


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("lens_q,lens_k,Hq,Hkv,D,bs,topk", CASES, ids=lambda x: str(x))
def test_torch_backend_same_head_dims(lens_q, lens_k, Hq, Hkv, D, bs, topk, fused, monkeypatch):
    """V's head dim equal to Q's: on the CPU the forward's tiles go through PyTorch's fused attention kernel
    (``grouped.CPU_FUSED``), or through the matmul tiles when it is off; both against the fp64 reference, gradients
    with and without the lse's."""
    real, calls = grouped._fused_cpu, []

    def spy(q, v):
        f = real(q, v)
        return None if f is None else lambda *a, **kw: calls.append(a[4]) or f(*a, **kw)     # is_causal
    monkeypatch.setattr(grouped, "CPU_FUSED", fused)
    monkeypatch.setattr(grouped, "FUSED_MIN_ROWS", 1)     # every chosen group fused too, however few its rows
    monkeypatch.setattr(grouped, "_fused_cpu", spy)
    q, k, v, extra = make_inputs(lens_q, lens_k, Hq, Hkv, D)
    check_against_reference(q, k, v, bs, topk, "torch", 1e-10, extra)
    check_out_only_grads(q, k, v, bs, topk, extra)
    if not fused:
        assert not calls
    elif lens_q == lens_k and sum(lens_q):      # every own block is a causal square, chosen blocks or not
        assert True in calls
    if fused and topk > 1 and max(lens_q) and max(lens_k) > bs:
        assert False in calls                   # a chosen group's (unmasked) call


def test_torch_backend_fused_runs_split_by_tile(monkeypatch):
    """Runs of causal squares cut at TILE elements of Q and across packed sequences: still the reference."""
    monkeypatch.setattr(grouped, "TILE", 4 * 16 * 4 * 16)          # 4 blocks of 16 rows x 4 heads x D 16 per run
    monkeypatch.setattr(grouped, "FUSED_MIN_ROWS", 1)
    q, k, v, extra = make_inputs([100, 48, 7], [100, 48, 7], 4, 2, 16)
    plan_runs = []
    real = grouped._square_runs
    monkeypatch.setattr(grouped, "_square_runs", lambda *a: plan_runs.append(real(*a)) or plan_runs[-1])
    check_against_reference(q, k, v, 16, 3, "torch", 1e-10, extra)
    runs, rest = plan_runs[0]
    assert max(nb for _, _, nb, _ in runs) == 4 and not rest
    assert sum(nb * n for _, _, nb, n in runs) == 155 and {n for *_, n in runs} == {16, 4, 7}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_torch_backend_fused_backward_pieces(dtype, monkeypatch):
    """The CPU backward through PyTorch's fused kernel (no lse gradient): causal squares, and chosen groups cut into
    pieces of two sizes (here 48 and 16 rows: some padded), several batches of pieces (small TILE), packed sequences
    whose last blocks are short (those groups go to the matmul tiles); against the fp64 reference. With an lse
    gradient it is not used (the matmul tiles)."""
    monkeypatch.setattr(grouped, "PIECE_ROWS", (48, 16))
    monkeypatch.setattr(grouped, "BWD_TILE", 16 * 48 * 4)         # 4 large or 12 small pieces per batch
    monkeypatch.setattr(grouped, "FUSED_MIN_ROWS", 8)
    batches = []
    real = grouped._pieces_bwd
    monkeypatch.setattr(grouped, "_pieces_bwd", lambda f, c, L, Hkv, pieces, *a: batches.append((c, len(pieces)))
                        or real(f, c, L, Hkv, pieces, *a))
    q, k, v, extra = make_inputs([300, 170, 45], [300, 170, 45], 6, 2, 16, dtype=dtype)
    dout = torch.randn(q.shape, dtype=torch.float64)
    got, want = ([x.detach().clone().requires_grad_() for x in (q, k, v)] for _ in range(2))
    out = moba.moba_attention(*got, 16, 3, backend="torch", **extra)
    ref = moba.naive_moba_attention(*(x.double() for x in want), 16, 3, **extra)
    (out.double() * dout).sum().backward()
    (ref * dout).sum().backward()
    sizes = dict(batches)
    assert sizes.get(48, 0) > 4 and sizes.get(16, 0) > 12            # both sizes, several batches of each
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    for a, b in zip([x.grad for x in got], [x.grad for x in want]):
        assert rel_err(a, b) < tol
    batches.clear()
    check_against_reference(q, k, v, 16, 3, "torch", tol, extra)    # an lse gradient too: matmul tiles only
    assert not batches


def test_fused_cpu_kernel_probe():
    """The CPU kernel is used only if a probe finds it computing what it is used for; this PyTorch's passes."""
    real = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    assert grouped._probe(real) and grouped._fused_cpu_op() is not None
    wrong = lambda q, k, v, *a, **kw: (lambda o, lse: (o + 1e-3, lse))(*real(q, k, v, *a, **kw))   # noqa: E731
    assert not grouped._probe(wrong)

    def changed(*a, **kw):
        raise RuntimeError("an argument it no longer takes")
    assert not grouped._probe(changed)


def test_fused_cpu_backward_probe():
    """The backward's kernel likewise: this PyTorch's passes; one a little off fails, as does one that computes its own
    softmax over the keys it is given (ignoring the log-sum-exp passed in: a key tile's share would be wrong), or
    one whose call fails."""
    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    real = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    assert grouped._probe_bwd(fwd, real) and grouped._fused_cpu_bwd_op() is not None

    def off(*a, **kw):
        gq, gk, gv = real(*a, **kw)
        return gq + 1e-3, gk, gv

    def own_softmax(do, q, k, v, out, lse, p, causal, scale=None):
        o, l2 = fwd(q, k, v, p, causal, scale=scale)
        return real(do, q, k, v, o, l2, p, causal, scale=scale)

    def changed(*a, **kw):
        raise RuntimeError("an argument it no longer takes")
    assert not any(grouped._probe_bwd(fwd, f) for f in (off, own_softmax, changed))


def test_torch_backend_fp32_and_noncontiguous():
    # transformers hands [B, H, T, D] tensors transposed to [B, T, H, D]: not contiguous
    q = torch.randn(2, 4, 90, 32).transpose(1, 2)
    k = torch.randn(2, 2, 90, 32).transpose(1, 2)
    v = torch.randn(2, 2, 90, 32).transpose(1, 2)
    assert not q.is_contiguous()
    check_against_reference(q, k, v, 16, 3, "torch", 1e-5, {})
    # slices of a fused projection's output (strided heads and rows): packing keeps them views
    x, y = torch.randn(1, 100, 4, 96), torch.randn(1, 100, 2, 64)
    check_against_reference(x[..., :32], y[..., :32], y[..., 32:], 16, 3, "torch", 1e-5, {})


@pytest.mark.parametrize("fused,min_rows", [(True, 1), (True, 12), (True, 10**9), (False, 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_backend_half(dtype, fused, min_rows, monkeypatch):
    """fp16/bf16 within twice the reference's own rounding at that dtype, forward and gradients; fused (the CPU
    kernel reads them as they are, each tile's output rounded once) with every chosen group through the kernel, some
    (groups of 12 rows or more; the others, unscaled half rows, as matmuls), none, or as fp32 matmul tiles."""
    monkeypatch.setattr(grouped, "CPU_FUSED", fused)
    monkeypatch.setattr(grouped, "FUSED_MIN_ROWS", min_rows)
    plans, make_plan = [], grouped.make_plan
    monkeypatch.setattr(grouped, "make_plan", lambda *a: plans.append(make_plan(*a)) or plans[-1])
    q, k, v, _ = make_inputs([120], [120], 4, 2, 32, dtype=dtype)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = moba.moba_attention(q, k, v, 16, 3, backend="torch")
    assert out.dtype == dtype
    sizes = [n for *_, n in plans[0].groups]
    assert min(sizes) < 12 <= max(sizes)            # the 12-row threshold splits the groups both ways
    w = torch.randn_like(out, dtype=torch.float64)
    (out.double() * w).sum().backward()
    grads = [x.grad for x in (q, k, v)]
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = moba.naive_moba_attention(qd, kd, vd, 16, 3)
    (ref * w).sum().backward()
    low = moba.naive_moba_attention(*(x.detach() for x in (q, k, v)), 16, 3)   # the reference's own rounding
    assert rel_err(out, ref) <= 2 * rel_err(low, ref) + 1e-3
    for g, want in zip(grads, (qd.grad, kd.grad, vd.grad)):
        assert g.dtype == dtype and rel_err(g, want) < 2e-2



def _causal(q, k, v, scale=None):
    G = q.shape[2] // k.shape[2]
    kr, vr = (x.repeat_interleave(G, 2).transpose(1, 2) for x in (k, v))
    Tq, Tk = q.shape[1], k.shape[1]
    mask = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    return F.scaled_dot_product_attention(q.transpose(1, 2), kr, vr, attn_mask=mask, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_topk_covering_all_blocks_is_causal_attention(backend):
    q, k, v, _ = make_inputs([97, 97], [97, 97], 4, 2, 16)
    out = moba.moba_attention(q, k, v, 16, 7, backend=backend, scale=0.2)
    torch.testing.assert_close(out, _causal(q, k, v, scale=0.2), rtol=1e-10, atol=1e-10)
    q, k, v, _ = make_inputs([20], [90], 4, 2, 16)
    out = moba.moba_attention(q, k, v, 8, 100, backend=backend)
    torch.testing.assert_close(out, _causal(q, k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_topk_one_is_block_local_causal(backend):
    bs = 16
    q, k, v, _ = make_inputs([100], [100], 2, 1, 16)
    out = moba.moba_attention(q, k, v, bs, 1, backend=backend)
    blk = torch.arange(100) // bs
    mask = (blk[:, None] == blk[None, :]) & torch.ones(100, 100, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2),
                                          v.repeat_interleave(2, 2).transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_small_topk_differs_from_dense(backend):
    q, k, v, _ = make_inputs([128], [128], 2, 2, 16)
    out = moba.moba_attention(q, k, v, 16, 2, backend=backend)
    dense = _causal(q, k, v)
    assert (out - dense).abs().max() > 1e-2
    # but the first two blocks read everything there is
    torch.testing.assert_close(out[:, :32], dense[:, :32], rtol=1e-10, atol=1e-10)


def test_select_blocks_layout():
    q, k, _, extra = make_inputs([40, 1, 67], [40, 1, 67], 4, 2, 16)
    sel = moba.select_blocks(q, k, 8, 3, **extra)
    assert sel.shape == (1, 108, 4, 3) and sel.dtype == torch.int32
    pos = torch.cat([torch.arange(40), torch.arange(1), torch.arange(67)])
    assert torch.equal(sel[0, :, :, 0], (pos // 8)[:, None].expand(-1, 4).int())
    past = sel[0, :, :, 1:]
    n_past = (pos // 8).clamp(max=2)
    assert torch.equal((past >= 0).sum(-1), n_past[:, None].expand(-1, 4))
    assert ((past < (pos // 8)[:, None, None]) | (past == -1)).all()
    # and it is the reference's choice, slot for slot
    from moba.ops.naive import naive_select
    want = naive_select(q[0, 41:], k[0, 41:], 8, 3)
    assert torch.equal(sel[0, 41:], want)


def test_default_backend_runs_on_cpu():
    q, k, v, _ = make_inputs([50], [50], 2, 2, 16, dtype=torch.float32)
    out = moba.moba_attention(q, k, v, 8, 2)
    assert rel_err(out, moba.naive_moba_attention(q, k, v, 8, 2)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_backend_transposed_inputs(dtype):
    """q, k, v transposed from [B, H, T, D] (as attention modules hold them): T and H do not fold into one dimension;
    the CPU forward reads them in place whatever their dtype (bf16/fp16 once failed here with a view error)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 150, 32, generator=g).to(dtype).transpose(1, 2) for h in (4, 2, 2))
    assert not q.is_contiguous()
    out = moba.moba_attention(q, k, v, 16, 3, backend="torch")
    ref = moba.naive_moba_attention(q.double(), k.double(), v.double(), 16, 3)
    low = moba.naive_moba_attention(q, k, v, 16, 3)
    assert rel_err(out, ref) <= 2 * rel_err(low, ref) + (1e-3 if dtype != torch.float32 else 1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_gate_top_matches_topk(n, monkeypatch):
    """The gate's small-n top (repeated max) equals ``topk(sorted=True)``: values, indices and order, rows with masked
    (-inf) blocks and rows with fewer finite blocks than n included."""
    from moba.ops import gate
    monkeypatch.setattr(gate, "TOP_MIN_SIZE", 1)
    g = torch.Generator().manual_seed(n)
    score = torch.randn(50, 3, 9, generator=g)
    score[:, :, 6:] = float("-inf")                 # blocks not yet earlier than any query
    score[:10, :, 2:] = float("-inf")               # rows with only two finite blocks
    want_v, want_i = score.topk(n, dim=-1, sorted=True)
    got_v, got_i = gate._top(score.clone(), n)
    assert torch.equal(got_v, want_v)
    fin = torch.isfinite(want_v)                    # where the value is -inf the index is arbitrary (unused: -1)
    assert torch.equal(got_i[fin], want_i[fin])
