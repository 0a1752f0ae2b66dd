"""The ``gate="group"`` variant (not the paper's MoBA): the query heads of a kv head choose the same blocks, by the
sum of their scores. Every backend against the fp64 reference (``naive_moba_attention(..., gate="group")``), forward
and gradients, and the reference's choice against the definition written out."""
import pytest
import torch

import moba
from helpers import DEVICE, backends, device_of, make_inputs, needs_triton, rel_err, run_with_grads
from moba.naive import naive_select
from test_kvcache import _setup

# (lens_q, lens_k, Hq, Hkv, block, topk): T not a multiple of the block, odd group sizes, packed sequences of
# different lengths, queries fewer than keys; "many-blocks" has more blocks than the per-kv-head gate takes at once
# (configs.GATE_SHARED_BLOCKS) and enough slots for the replacement scan (GATE_REPLACE_S)
SHAPES = {
    "one-seq-G3": ([77], [77], 6, 2, 8, 3),
    "varlen-G4": ([40, 9, 70], [40, 9, 70], 4, 1, 8, 4),
    "tq-lt-tk": ([5, 20], [60, 33], 4, 2, 8, 3),
    "many-blocks": ([300], [300], 4, 2, 8, 20),
}


def test_reference_chooses_by_the_groups_summed_scores():
    """naive_select's group choice against the definition: per (query, kv head), the top blocks by
    sum over the group's heads of <q_h, mean of the block's keys>, among strictly earlier blocks."""
    Tk, Hq, Hkv, D, bs, topk = 50, 6, 2, 8, 5, 4
    q = torch.randn(Tk, Hq, D, dtype=torch.float64)
    k = torch.randn(Tk, Hkv, D, dtype=torch.float64)
    sel = naive_select(q, k, bs, topk, gate="group")
    G = Hq // Hkv
    for t in range(Tk):
        own = t // bs
        assert (sel[t, :, 0] == own).all()
        for g in range(Hkv):
            heads = sel[t, g * G:(g + 1) * G]
            assert (heads == heads[0]).all()                         # one choice for the whole group
            means = torch.stack([k[b * bs:(b + 1) * bs, g].mean(0) for b in range(own)]) if own else None
            n = min(topk - 1, own)
            if n == 0:
                assert (heads[0, 1:] == -1).all()
                continue
            score = (q[t, g * G:(g + 1) * G] @ means.T).sum(0)
            assert heads[0, 1:1 + n].tolist() == score.topk(n).indices.tolist()
            assert (heads[0, 1 + n:] == -1).all()


def test_group_differs_from_head_and_equals_it_without_grouping():
    q, k, v, _ = make_inputs([64], [64], 4, 1, 16)
    head = moba.select_blocks(q, k, 8, 3)
    group = moba.select_blocks(q, k, 8, 3, gate="group")
    assert (group == group[:, :, :1]).all() and not (head == head[:, :, :1]).all()
    assert torch.equal(group, naive_select(q[0], k[0], 8, 3, gate="group")[None])
    q, k, v, _ = make_inputs([64], [64], 3, 3, 16)                 # one query head per kv head: the same gate
    assert torch.equal(moba.moba_attention(q, k, v, 8, 3, gate="group"), moba.moba_attention(q, k, v, 8, 3))


@pytest.mark.parametrize("backend", [b for b in backends() if b != "naive"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_group_gate_against_reference(backend, shape):
    lens_q, lens_k, Hq, Hkv, bs, topk = SHAPES[shape]
    if backend != "torch" and not torch.cuda.is_available() and shape == "many-blocks":
        pytest.skip("the interpreter: 300 queries of 20 slots run for minutes; the kernel form runs on a GPU")
    dtype = torch.float64 if backend == "torch" else torch.float32
    dev = device_of(backend)
    q, k, v, extra = make_inputs(lens_q, lens_k, Hq, Hkv, 16, dtype=dtype, device=dev)
    dout = torch.randn(q.shape[:3] + (v.shape[3],), dtype=torch.float64, device=dev)
    dlse = torch.randn(q.shape[:3], dtype=torch.float64, device=dev)
    got = run_with_grads(lambda *a, **kw: moba.moba_attention(*a, bs, topk, backend=backend, gate="group", **kw),
                         q, k, v, dout, dlse, **extra)
    want = run_with_grads(lambda *a, **kw: moba.naive_moba_attention(*a, bs, topk, gate="group", **kw),
                          *(x.double() for x in (q, k, v)), dout, dlse, **extra)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert rel_err(a, b) < tol, name
    with torch.no_grad():    # inference: one query per sequence takes the decode kernel on the Triton backends
        q1 = q[:, -1:] if not extra else q[:, [x - 1 for x in extra["cu_seqlens"][1:].tolist()]]
        cu_k = extra.get("cu_seqlens_k")
        ex1 = {} if not extra else dict(cu_seqlens=torch.arange(len(lens_q) + 1, dtype=torch.int32, device=dev),
                                        cu_seqlens_k=extra["cu_seqlens"] if cu_k is None else cu_k)
        out = moba.moba_attention(q1, k, v, bs, topk, backend=backend, gate="group", **ex1)
        ref = moba.naive_moba_attention(q1.double(), k.double(), v.double(), bs, topk, gate="group", **ex1)
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("backend", [b for b in backends() if b in ("torch", "triton")])
@pytest.mark.parametrize("listed", [0, 1], ids=["gate-per-split", "listed"])
@pytest.mark.parametrize("paged", [None, 4], ids=["contiguous", "paged"])
def test_group_gate_with_kvcache(backend, listed, paged, monkeypatch):
    """moba_attention_with_kvcache(gate="group"): decode steps and speculative tokens against the reference."""
    if listed and backend != "triton":
        pytest.skip("a launch config of the Triton decode kernel")
    if backend == "triton":
        from moba.triton import configs
        monkeypatch.setitem(configs.CONFIG, "decode", configs.DECODE_DEFAULT[:6] + (listed,))
    dtype = torch.float64 if backend == "torch" else torch.float32
    bs, topk, Tq = 8, 3, 2
    q, kc, vc, seqlens, bt, k_new, v_new, keys, vals = _setup(3, [37, 100, 64], Tq, 6, 2, 16, paged, dtype)
    dev = device_of(backend)
    q, kc, vc, seqlens, bt, k_new, v_new = (None if x is None else x.to(dev)
                                            for x in (q, kc, vc, seqlens, bt, k_new, v_new))
    sums = moba.cache_key_sums(kc, bs, cache_seqlens=seqlens, block_table=bt)
    out = moba.moba_attention_with_kvcache(q, kc, vc, bs, topk, cache_seqlens=seqlens, block_table=bt, k_new=k_new,
                                           v_new=v_new, key_sums=sums, backend=backend, gate="group")
    want = torch.cat([moba.naive_moba_attention(q[b:b + 1].cpu().double(), keys[b][None], vals[b][None], bs, topk,
                                                gate="group") for b in range(3)])
    assert rel_err(out.cpu(), want) < (1e-10 if dtype == torch.float64 else 2e-5)


def test_gate_argument_is_checked():
    q, k, v, _ = make_inputs([16], [16], 4, 2, 8)
    for call in (lambda: moba.moba_attention(q, k, v, 8, 2, gate="kv"),
                 lambda: moba.select_blocks(q, k, 8, 2, gate=None),
                 lambda: moba.naive_moba_attention(q, k, v, 8, 2, gate="heads"),
                 lambda: moba.moba_attention_with_kvcache(q[:, -1:], k, v, 8, 2, cache_seqlens=torch.tensor([15],
                                                          dtype=torch.int32), gate="Group")):
        with pytest.raises(ValueError, match="gate must be 'head'"):
            call()


@needs_triton
@pytest.mark.parametrize("limit", [None, 17], ids=["per_kv_head", "per_head"])
def test_triton_group_gate_forms_match_the_torch_gate(limit, monkeypatch):
    """Both forms of the Triton gate with gate="group" (one program per query tile and kv head for sequences of at
    most GATE_SHARED_BLOCKS blocks, else `_gate_topk`; the limit lowered to 17 sends 18 or more blocks to the latter,
    in chunks of 16) choose what the torch gate chooses in fp64, the same blocks for every head of a group."""
    from moba.layout import pack, validate
    from moba.torch_backend import gate as torch_gate
    from moba.triton import gate as triton_gate
    if limit is not None:
        monkeypatch.setattr(triton_gate, "GATE_SHARED_BLOCKS", limit)
    q, k, v, extra = make_inputs([150, 3, 90], [150, 3, 90], 6, 2, 32, dtype=torch.float32, device=DEVICE)
    for bs, topk in ((8, 3), (4, 5)):
        lay, _ = validate(q, k, v, bs, topk, **extra)
        got = triton_gate.select_past_blocks(pack(q), pack(k), lay, lay.tensors(q.device), topk, group=True).cpu()
        qc, kc = pack(q).cpu().double(), pack(k).cpu().double()
        want = torch_gate.select_past_blocks(qc, kc, lay, lay.tensors(torch.device("cpu")), topk, group=True)
        assert torch.equal(got, want)
        assert (got.view(got.shape[0], 2, 3, -1) == got.view(got.shape[0], 2, 3, -1)[:, :, :1]).all()
