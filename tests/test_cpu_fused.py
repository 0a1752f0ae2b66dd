"""The torch backend on the CPU: its tiles through PyTorch's fused attention kernels (forward and backward), the
probes that decide whether those kernels may be used, and the thresholds that split the work between them and plain
matmul tiles; each against the fp64 reference."""
import pytest
import torch

import moba
from helpers import SHAPES, VARLEN, check_against_reference, make_inputs, rel_err
from moba.torch_backend import attention

CASES = {**SHAPES, **VARLEN}


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


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul"])
@pytest.mark.parametrize("lens_q,lens_k,Hq,Hkv,D,bs,topk", CASES.values(), ids=CASES.keys())
def test_same_head_dims(lens_q, lens_k, Hq, Hkv, D, bs, topk, fused, monkeypatch):
    """V's head dim equal to Q's: on the CPU the forward's tiles go through PyTorch's fused attention kernel
    (``CPU_FUSED``), or through the matmul tiles when it is off; both against the fp64 reference, gradients
    with and without the lse's."""
    real, calls = attention._fused_cpu, []

    def spy(q, v):
        f = real(q, v)
        return None if f is None else lambda *a, **kw: calls.append(a[4]) or f(*a, **kw)     # is_causal
    monkeypatch.setattr(attention, "CPU_FUSED", fused)
    monkeypatch.setattr(attention, "FUSED_MIN_ROWS", 1)     # every chosen group fused too, however few its rows
    monkeypatch.setattr(attention, "_fused_cpu", spy)
    q, k, v, extra = make_inputs(lens_q, lens_k, Hq, Hkv, D)
    check_against_reference(q, k, v, bs, topk, "torch", 1e-10, extra)
    check_out_only_grads(q, k, v, bs, topk, extra)
    if not fused:
        assert not calls
    elif lens_q == lens_k and sum(lens_q):      # every own block is a causal square, chosen blocks or not
        assert True in calls
    if fused and topk > 1 and max(lens_q) and max(lens_k) > bs:
        assert False in calls                   # a chosen group's (unmasked) call


def test_fused_runs_split_by_tile(monkeypatch):
    """Runs of causal squares cut at TILE elements of Q and across packed sequences: still the reference."""
    monkeypatch.setattr(attention, "TILE", 4 * 16 * 4 * 16)          # 4 blocks of 16 rows x 4 heads x D 16 per run
    monkeypatch.setattr(attention, "FUSED_MIN_ROWS", 1)
    q, k, v, extra = make_inputs([100, 48, 7], [100, 48, 7], 4, 2, 16)
    plan_runs = []
    real = attention._square_runs
    monkeypatch.setattr(attention, "_square_runs", lambda *a: plan_runs.append(real(*a)) or plan_runs[-1])
    check_against_reference(q, k, v, 16, 3, "torch", 1e-10, extra)
    runs, rest = plan_runs[0]
    assert max(nb for _, _, nb, _ in runs) == 4 and not rest
    assert sum(nb * n for _, _, nb, n in runs) == 155 and {n for *_, n in runs} == {16, 4, 7}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_fused_backward_pieces(dtype, monkeypatch):
    """The CPU backward through PyTorch's fused kernel (no lse gradient): causal squares, and chosen groups cut into
    pieces of two sizes (here 48 and 16 rows: some padded), several batches of pieces (small BWD_TILE), packed
    sequences whose last blocks are short (those groups go to the matmul tiles); against the fp64 reference. With an
    lse gradient it is not used (the matmul tiles)."""
    monkeypatch.setattr(attention, "PIECE_ROWS", (48, 16))
    monkeypatch.setattr(attention, "BWD_TILE", 16 * 48 * 4)         # 4 large or 12 small pieces per batch
    monkeypatch.setattr(attention, "FUSED_MIN_ROWS", 8)
    batches = []
    real = attention._pieces_bwd
    monkeypatch.setattr(attention, "_pieces_bwd", lambda f, c, L, Hkv, pieces, *a: batches.append((c, len(pieces)))
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
    assert attention._probe(real) and attention._fused_cpu_op() is not None
    wrong = lambda q, k, v, *a, **kw: (lambda o, lse: (o + 1e-3, lse))(*real(q, k, v, *a, **kw))   # noqa: E731
    assert not attention._probe(wrong)

    def changed(*a, **kw):
        raise RuntimeError("an argument it no longer takes")
    assert not attention._probe(changed)


def test_fused_cpu_backward_probe():
    """The backward's kernel likewise: this PyTorch's passes; one a little off fails, as does one that computes its own
    softmax over the keys it is given (ignoring the log-sum-exp passed in: a key tile's share would be wrong), or
    one whose call fails."""
    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    real = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    assert attention._probe_bwd(fwd, real) and attention._fused_cpu_bwd_op() is not None

    def off(*a, **kw):
        gq, gk, gv = real(*a, **kw)
        return gq + 1e-3, gk, gv

    def own_softmax(do, q, k, v, out, lse, p, causal, scale=None):
        o, l2 = fwd(q, k, v, p, causal, scale=scale)
        return real(do, q, k, v, o, l2, p, causal, scale=scale)

    def changed(*a, **kw):
        raise RuntimeError("an argument it no longer takes")
    assert not any(attention._probe_bwd(fwd, f) for f in (off, own_softmax, changed))


@pytest.mark.parametrize("fused,min_rows", [(True, 1), (True, 12), (True, 10**9), (False, 1)],
                         ids=["fused-all-groups", "fused-groups-of-12-rows", "fused-own-blocks-only", "matmul"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half(dtype, fused, min_rows, monkeypatch):
    """fp16/bf16 within twice the reference's own rounding at that dtype, forward and gradients; fused (the CPU
    kernel reads them as they are, each tile's output rounded once) with every chosen group through the kernel, some
    (groups of 12 rows or more; the others, unscaled half rows, as matmuls), none, or as fp32 matmul tiles."""
    monkeypatch.setattr(attention, "CPU_FUSED", fused)
    monkeypatch.setattr(attention, "FUSED_MIN_ROWS", min_rows)
    plans, make_plan = [], attention.make_plan
    monkeypatch.setattr(attention, "make_plan", lambda *a: plans.append(make_plan(*a)) or plans[-1])
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
