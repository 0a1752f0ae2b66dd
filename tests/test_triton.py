"""The Triton kernels under TRITON_INTERPRET=1 (CPU) against the fp64 reference: small fp32/fp16 shapes.

On a CUDA machine the same tests run the compiled kernels (tests/test_gpu.py adds bf16 and larger shapes).
"""
import pytest
import torch

import moba
from helpers import check_against_reference, make_inputs, rel_err

triton = pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    # lens_q, lens_k, Hq, Hkv, D, block, topk
    ([100], [100], 4, 2, 32, 16, 3),            # ragged tail, GQA 2
    ([40, 1, 67, 13], [40, 1, 67, 13], 4, 1, 16, 8, 3),   # packed, uneven, GQA 4
    ([16], [100], 4, 2, 16, 16, 3),             # Tq < Tk
    ([1, 1], [75, 33], 2, 2, 16, 16, 4),        # decoding rows of a packed batch
    ([5, 1, 20], [50, 9, 20], 3, 3, 16, 8, 2),  # varlen, Tq < Tk per sequence, odd head count
    ([64], [64], 2, 2, 16, 16, 1),              # topk 1
    ([130], [130], 2, 1, 48, 32, 2),            # head dim 48 (padded to 64 inside)
    ([90, 90], [90, 90], 2, 2, 16, 16, 20),     # topk covers everything
    ([1, 17], [130, 200], 2, 1, 16, 64, 3),     # a query tile straddling two own blocks
    ([0, 30], [12, 30], 2, 1, 16, 4, 3),        # an empty query sequence
    ([300], [300], 2, 1, 16, 4, 64),            # topk 64 (63 chosen blocks per row) over 75 blocks
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("lens_q,lens_k,Hq,Hkv,D,bs,topk", CASES, ids=lambda x: str(x))
def test_triton_fp32_matches_reference(lens_q, lens_k, Hq, Hkv, D, bs, topk, deterministic):
    q, k, v, extra = make_inputs(lens_q, lens_k, Hq, Hkv, D, dtype=torch.float32, device=DEV)
    check_against_reference(q, k, v, bs, topk, "triton", 2e-4, extra, deterministic=deterministic)


def test_triton_fp16_within_twice_the_references_own_rounding():
    q, k, v, extra = make_inputs([70, 58], [70, 58], 4, 2, 32, dtype=torch.float16, device=DEV)
    cu = extra["cu_seqlens"]
    ref = moba.naive_moba_attention(q.double(), k.double(), v.double(), 16, 3, cu_seqlens=cu)
    low = moba.naive_moba_attention(q, k, v, 16, 3, cu_seqlens=cu)
    out = moba.moba_attention(q, k, v, 16, 3, cu_seqlens=cu, backend="triton")
    assert out.dtype == torch.float16
    assert rel_err(out, ref) <= 2 * rel_err(low, ref) + 1e-4


def test_triton_different_dv_and_scale():
    q, k, v, extra = make_inputs([50], [50], 2, 1, 16, Dv=32, dtype=torch.float32, device=DEV)
    out, lse = moba.moba_attention(q, k, v, 8, 3, scale=0.11, return_lse=True, backend="triton")
    r_out, r_lse = moba.naive_moba_attention(q.double(), k.double(), v.double(), 8, 3, scale=0.11,
                                             return_lse=True)
    assert rel_err(out, r_out) < 2e-4 and rel_err(lse, r_lse) < 2e-4


def test_triton_deterministic_grads_repeat_bitwise():
    q, k, v, extra = make_inputs([60], [60], 2, 1, 16, dtype=torch.float32, device=DEV)
    grads = []
    for _ in range(2):
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        moba.moba_attention(qq, kk, vv, 8, 3, backend="triton", deterministic=True).square().sum().backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("replace_s", [16, 1], ids=["rounds", "replace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_gate_matches_torch_gate(dtype, replace_s, monkeypatch):
    """Both forms of the gate's running top-k (S rounds per chunk; the replacement scan and a final sort)."""
    from moba.ops import gate, parallel
    from moba.ops.utils import pack, validate
    monkeypatch.setattr(parallel, "GATE_REPLACE_S", replace_s)
    q, k, v, extra = make_inputs([150, 3, 90], [150, 3, 90], 4, 2, 32, dtype=dtype, device=DEV)
    for topk in (2, 4, 7, 17):
        lay, _ = validate(q, k, v, 8, topk, **extra)
        lt = lay.tensors(q.device)
        want = gate.select_past_blocks(pack(q), pack(k), lay, lt, topk)
        got = parallel.select_past_blocks(pack(q), pack(k), lay, lt, topk)
        # the same blocks; the order of two scores equal to ~1e-7 may differ
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)
        assert (got[..., 0] == want[..., 0]).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_gate_by_kv_head_matches_per_head(dtype, monkeypatch):
    """GATE_HEADS (`_gate_topk_g`: one program per query tile and kv head, for sequences of at most 33 blocks): the
    same selection, bitwise, as one program per head; block counts on both sides of its limit (past it the
    per-head gate runs)."""
    from moba.ops import parallel
    from moba.ops.utils import pack, validate
    q, k, v, extra = make_inputs([150, 3, 90], [150, 3, 90], 6, 2, 32, dtype=dtype, device=DEV)
    for bs, topk in ((8, 2), (8, 4), (16, 7), (4, 5)):          # 19, 19, 10 and 38 blocks in the longest sequence
        lay, _ = validate(q, k, v, bs, topk, **extra)
        lt = lay.tensors(q.device)
        got = []
        for heads in ("0", "1"):
            monkeypatch.setattr(parallel, "GATE_HEADS", heads)
            got.append(parallel.select_past_blocks(pack(q), pack(k), lay, lt, topk))
        assert torch.equal(got[0], got[1])


def test_triton_inference_in_several_query_chunks(monkeypatch):
    """Force tiny selection chunks: the forward must give the same answer chunk by chunk."""
    from moba.ops import parallel
    monkeypatch.setattr(parallel, "SELECT_BYTES", 1)
    monkeypatch.setattr(parallel, "FILL_BYTES", 0)        # no minimum of rows per chunk either
    q, k, v, extra = make_inputs([150, 70], [150, 70], 2, 1, 16, dtype=torch.float32, device=DEV)
    ref = moba.naive_moba_attention(q.double(), k.double(), v.double(), 16, 3, **extra)
    with torch.no_grad():
        out = moba.moba_attention(q, k, v, 16, 3, backend="triton", **extra)
    assert rel_err(out, ref) < 2e-4
    check_against_reference(q, k, v, 16, 3, "triton", 2e-4, extra)


def test_forward_chunks_with_a_backward_to_come():
    """The forward's query chunks: the 26.75M training shape at 8K with blocks of 128 (4 x 8192 rows, 8 / 2 heads, D 64,
    11 slots) runs in one chunk when its selection is kept for a backward (it ran in 6, each with 11 launches: a
    host-bound training step), in several without one; the chunks' entry ids stay within q's size / KEEP_SHARE."""
    from moba.ops import parallel
    T, Hq, Hkv, S, NB, D = 32768, 8, 2, 11, 256, 64
    q_bytes = T * Hq * D * 2
    assert parallel._chunk_rows(T, Hq, Hkv, S, NB, 128, q_bytes, keep=True) == T
    rows = parallel._chunk_rows(T, Hq, Hkv, S, NB, 128, q_bytes, keep=False)
    assert rows % 128 == 0 and rows < T and rows * Hq * S * 8 <= parallel.SELECT_BYTES
    # a benchmark shape (fb512k: 524288 rows, 32 / 8 heads, D 128, blocks of 128, topk 8)
    T, Hq, Hkv, S, NB, D = 524288, 32, 8, 7, 4096, 128
    q_bytes = T * Hq * D * 2
    rows = parallel._chunk_rows(T, Hq, Hkv, S, NB, 128, q_bytes, keep=True)
    assert rows == T and rows * Hq * S * 4 <= q_bytes // parallel.KEEP_SHARE
    rows = parallel._chunk_rows(T, Hq, Hkv, S, NB, 128, q_bytes, keep=False)
    assert rows < T and rows * Hq * S * 8 <= q_bytes // parallel.SELECT_SHARE


@pytest.mark.parametrize("heads", ["0", "1"], ids=["per_head", "per_kv_head"])
def test_triton_gate_counts_the_grouping(monkeypatch, heads):
    """GATE_COUNT: the gate counts each chosen entry for the forward's grouping (no counting pass): the same
    output, bitwise, as with the counting pass, over several query chunks of more than 1024 entries each (so that
    the counters' copies matter), packed sequences of different lengths; and the fp64 reference's. Both gates
    (GATE_HEADS)."""
    from moba.ops import parallel
    monkeypatch.setattr(parallel, "GATE_HEADS", heads)
    monkeypatch.setattr(parallel, "SELECT_BYTES", 1)
    monkeypatch.setattr(parallel, "FILL_BYTES", 0)
    q, k, v, extra = make_inputs([300, 170, 5], [300, 170, 5], 8, 2, 16, dtype=torch.float32, device=DEV)
    outs = []
    for count in ("0", "1"):
        monkeypatch.setattr(parallel, "GATE_COUNT", count)
        with torch.no_grad():
            outs.append(moba.moba_attention(q, k, v, 16, 5, backend="triton", return_lse=True, **extra))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    check_against_reference(q, k, v, 16, 5, "triton", 2e-4, extra)


@pytest.mark.parametrize("cfg", [
    {"gate": (32, 16, 4, 1), "fwd": (16, 32, 4, 1), "own": (64, 16, 4, 1),
     "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1), "own_dq": (16, 64, 4, 1)},
    {"gate": (16, 16, 4, 1), "fwd": (64, 16, 4, 1), "own": (16, 32, 4, 1),
     "dkdv": (64, 16, 4, 1), "dq": (16, 32, 4, 1), "own_dq": (32, 16, 4, 1)},
], ids=["cfg_a", "cfg_b"])
def test_triton_each_kernel_with_its_own_tile_sizes(monkeypatch, cfg):
    """Every kernel kind takes its own (BM, BN): tile lists of different row counts must not mix."""
    from moba.ops import parallel
    monkeypatch.setattr(parallel, "CONFIG", dict(cfg))
    monkeypatch.setattr(parallel, "SELECT_BYTES", 1)       # several query chunks, cut at 128 rows
    monkeypatch.setattr(parallel, "FILL_BYTES", 0)
    q, k, v, extra = make_inputs([150, 1, 200], [150, 9, 200], 4, 2, 16, dtype=torch.float32, device=DEV)
    check_against_reference(q, k, v, 16, 3, "triton", 2e-4, extra)


def test_triton_rejects_large_head_dim_clearly():
    q, k, v, _ = make_inputs([20], [20], 2, 1, 160, dtype=torch.float32, device=DEV)
    with pytest.raises(ValueError, match="head dims"):
        moba.moba_attention(q, k, v, 8, 2, backend="triton")


def _groups_in_torch(sel, Hkv, NB, BM, by_slot):
    """parallel._group's bookkeeping in plain torch: sort keys, group offsets, tiles before each group,
    and each tile's group and first entry."""
    n, Hq, S = sel.shape
    G, NG = Hq // Hkv, Hkv * NB
    NK = S * NG if by_slot else NG
    slot = torch.arange(S, device=DEV)[None, None, :] if by_slot else torch.zeros(1, 1, 1, dtype=torch.long, device=DEV)
    key = torch.where(sel >= 0, slot * NG + sel + (torch.arange(Hq, device=DEV) // G * NB)[None, :, None], NK)
    key = key.reshape(-1)
    off = torch.searchsorted(key.sort().values, torch.arange(NK + 1, device=DEV, dtype=key.dtype))
    tiles = (off.diff() + BM - 1) // BM
    cum = torch.cat([tiles.new_zeros(1), tiles.cumsum(0)])
    i = torch.arange(-(-n * Hq * S // BM) + NK, device=DEV)
    g = torch.searchsorted(cum[1:], i, right=True).clamp(max=NK - 1)
    e0 = torch.where(i < cum[-1], off[g] + (i - cum[g]) * BM, off[g + 1])
    return key, NK, off, cum, g, e0


GROUP_CASES = [(100, 4, 2, 3, 7, 16), (1, 2, 1, 1, 2, 128), (300, 8, 2, 5, 1100, 32), (0, 4, 2, 2, 5, 16),
               (64, 4, 4, 2, 3, 64)]


@pytest.mark.parametrize("n,Hq,Hkv,S,NB,BM", GROUP_CASES)
@pytest.mark.parametrize("spans", [8, 0], ids=["scan1", "scan_split"])
def test_triton_grouping_matches_a_torch_sort(n, Hq, Hkv, S, NB, BM, spans, monkeypatch):
    """parallel._group with ``stable`` (the deterministic backward: a stable sort) against plain torch; its
    scan in one program and split over spans of groups."""
    from moba.ops import parallel
    monkeypatch.setattr(parallel, "SCAN_SPANS", spans)
    sel = torch.randint(-1, NB, (n, Hq, S), dtype=torch.int32, device=DEV)
    key, NK, want_off, want_cum, want_g, want_e0 = _groups_in_torch(sel, Hkv, NB, BM, False)
    _, want_ent = torch.sort(key, stable=True)
    ent, off, tile_g, tile_e0, tile_cum = parallel._group(sel, Hkv, NB, BM, by_slot=False, stable=True)
    for got, want in ((ent, want_ent), (off, want_off), (tile_cum, want_cum), (tile_g, want_g), (tile_e0, want_e0)):
        assert torch.equal(got.long().cpu(), want.long().cpu())


@pytest.mark.parametrize("n,Hq,Hkv,S,NB,BM", GROUP_CASES)
@pytest.mark.parametrize("copies,by_slot,spans", [(8, True, 8), (1, True, 8), (8, False, 8), (8, True, 0),
                                                  (1, True, 0)])
def test_triton_slot_grouping_matches_a_torch_sort(n, Hq, Hkv, S, NB, BM, copies, by_slot, spans, monkeypatch):
    """parallel._group's counting sort (by (slot, kv head, block) for the forward) against plain torch:
    the same groups with the same members (their order inside a group is free), offsets and tile table;
    with 8 copies of the counters and with one (used for very many groups); and by (kv head, block) only,
    as the backward groups them; the scan in one program and (spans 0) split over spans of groups. By slot, also
    the flat tile table (first entry, end entry, the block's first and end key) the Gluon forward's QE reads."""
    from moba.ops import parallel
    monkeypatch.setattr(parallel, "PLACE_COPIES", copies)
    monkeypatch.setattr(parallel, "SCAN_SPANS", spans)
    sel = torch.randint(-1, NB, (n, Hq, S), dtype=torch.int32, device=DEV)
    key, NK, want_off, want_cum, want_g, want_e0 = _groups_in_torch(sel, Hkv, NB, BM, by_slot)
    starts = torch.randint(0, 1000, (NB,), device=DEV).cumsum(0)
    blocks = (starts, starts + torch.randint(1, 500, (NB,), device=DEV)) if by_slot else None
    ent, off, tile_g, tile_e0, tile_cum, *tinfo = parallel._group(sel, Hkv, NB, BM, by_slot=by_slot, blocks=blocks)
    for got, want in ((off, want_off), (tile_cum, want_cum), (tile_g, want_g), (tile_e0, want_e0)):
        assert torch.equal(got.long().cpu(), want.long().cpu())
    if by_slot:
        b = want_g % NB
        want_info = torch.stack([want_e0, want_off[want_g + 1], blocks[0][b], blocks[1][b]], 1)
        assert tinfo[0].dtype == torch.int32 and torch.equal(tinfo[0].long().cpu(), want_info.long().cpu())
    else:
        assert not tinfo
    ent = ent[:int(want_off[-1])].long()
    assert torch.equal(key[ent].cpu(), key.sort().values[:len(ent)].cpu())     # each entry in its group
    assert torch.equal(ent.sort().values.cpu(), (key < NK).nonzero().flatten().cpu())  # each valid one once


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_block_means_match_torch(dtype):
    """parallel.block_means (one Triton launch) against gate.block_means: ragged tails, packed sequences."""
    from moba.ops import gate, parallel
    from moba.ops.utils import pack, validate
    q, k, v, extra = make_inputs([150, 3, 90], [150, 3, 90], 4, 2, 40, dtype=dtype, device=DEV)
    for bs in (8, 64):
        lay, _ = validate(q, k, v, bs, 3, **extra)
        lt = lay.tensors(q.device)
        want = gate.block_means(pack(k), lay, lt)
        got = parallel.block_means(pack(k), lay, lt)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.allclose(got, want.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("limit,dtype", [(2**15, torch.int16), (8, torch.int32)], ids=["int16", "int32"])
def test_triton_kept_selection_dtype_and_gradients(limit, dtype, monkeypatch):
    """The selection kept for the backward is int16 while every block id fits, else int32; the op's fake shapes
    (torch.compile) agree, and the gradients match the reference either way."""
    from moba.ops import custom, utils
    monkeypatch.setattr(utils, "SEL16_LIMIT", limit)
    q, k, v, extra = make_inputs([40, 1, 67], [40, 1, 67], 4, 2, 16, dtype=torch.float32, device=DEV)
    cu = extra["cu_seqlens"]
    for x in (q, k, v):
        x.requires_grad_(True)
    args = (q, k, v, cu, cu, 8, 3, 0.25, "triton", False, True, None)
    _, _, sel = custom.moba_fwd(*args)
    assert sel.dtype == dtype and sel.shape == (108, 4, 2)
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
        assert custom.moba_fwd(*args)[2].dtype == dtype
    check_against_reference(q.detach(), k.detach(), v.detach(), 8, 3, "triton", 2e-4, extra)


@pytest.mark.parametrize("lens_q,lens_k,bs", [([3001], [3001], 128), ([700, 1, 1500, 90], [700, 1, 1500, 90], 96),
                                              ([300, 17, 1, 0], [900, 400, 64, 5], 64), ([200], [1000], 448)],
                         ids=lambda x: str(x))
def test_own_tiles_cover_every_row_once_inside_one_block(lens_q, lens_k, bs):
    """The Gluon own-block kernel's work list (`parallel._own_tiles`; the kernel itself runs in test_gpu.py): every
    query row in exactly one tile of <= 128 rows, all rows of a tile in the same own block (the kernel reads one
    block start per tile), longest tiles (most keys up to the last row) first; each tile's sequence's first block."""
    from moba.ops import parallel
    from moba.ops.utils import validate
    q, k, v, extra = make_inputs(lens_q, lens_k, 2, 1, 16, dtype=torch.float32, device="cpu")
    lay, _ = validate(q, k, v, bs, 3, **extra)
    q0, q1, p0, kb, fb = (x.tolist() for x in parallel._own_tiles(lay, "cpu"))
    lt = lay.tensors("cpu")
    own = lt.own_block.tolist()
    rows, keys = [], []
    for a, b, p, s, f in zip(q0, q1, p0, kb, fb):
        assert 0 < b - a <= 128
        assert len({own[r] for r in range(a, b)}) == 1, (a, b)
        assert own[a] == f + (p - s) // bs           # the sequence's first block id (the fused gate's block ids)
        assert lt.q_pos[a].item() == p
        lo = s + (p - s) // bs * bs
        assert lt.q_pos[b - 1].item() < lo + bs
        rows.extend(range(a, b))
        keys.append(p + (b - a) - lo)
    assert sorted(rows) == list(range(sum(lens_q)))
    assert keys == sorted(keys, reverse=True)
