"""The gate: block means, the top-k of earlier blocks per (query, head), ``select_blocks``; the Triton gate (both of
its forms, and its counting for the forward's grouping) against the torch one."""
import pytest
import torch

import moba
from helpers import DEVICE, backends, check_against_reference, make_inputs, needs_triton
from moba.layout import pack, validate
from moba.torch_backend import gate


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
    from moba.naive import naive_select
    want = naive_select(q[0, 41:], k[0, 41:], 8, 3)
    assert torch.equal(sel[0, 41:], want)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_gate_top_matches_topk(n, monkeypatch):
    """The gate's small-n top (repeated max) equals ``topk(sorted=True)``: values, indices and order, rows with masked
    (-inf) blocks and rows with fewer finite blocks than n included."""
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


@pytest.mark.parametrize("slice_seqs", [64, 0], ids=["views", "gathered"])
@pytest.mark.parametrize("pool_tile", [1 << 25, 3 * 8 * 2 * 16], ids=["one-pass", "three-blocks-a-pass"])
def test_block_means_paths_against_definition(slice_seqs, pool_tile, monkeypatch):
    """Both pooling paths (per-sequence views, gathered tiles), in one or several passes, on strided
    packed keys of uneven sequences (partial last blocks, an empty sequence) against a plain loop."""
    monkeypatch.setattr(gate, "SLICE_SEQS", slice_seqs)
    monkeypatch.setattr(gate, "POOL_TILE", pool_tile)
    torch.manual_seed(2)
    lens = [37, 0, 8, 100, 5]
    kh = torch.randn(2, sum(lens), 16, dtype=torch.float64)                 # [Hkv, T, D]: strided after transpose
    k = kh.transpose(0, 1)
    cu = torch.tensor([0] + lens).cumsum(0)
    lay, _ = validate(k[None], k[None], k[None], 8, 2, cu, cu)
    got = gate.block_means(k, lay, lay.tensors("cpu"))
    want = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        for s in range(a, b, 8):
            want.append(k[s:min(s + 8, b)].mean(0))
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-12, atol=1e-12)


# --- the Triton gate ---

@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_block_means_match_torch(dtype):
    """The Triton block means (one launch) against the torch backend's: ragged tails, packed sequences."""
    from moba.triton import gate as triton_gate
    q, k, v, extra = make_inputs([150, 3, 90], [150, 3, 90], 4, 2, 40, dtype=dtype, device=DEVICE)
    for bs in (8, 64):
        lay, _ = validate(q, k, v, bs, 3, **extra)
        lt = lay.tensors(q.device)
        want = gate.block_means(pack(k), lay, lt)
        got = triton_gate.block_means(pack(k), lay, lt)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.allclose(got, want.float(), rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("replace_s", [16, 1], ids=["rounds", "replace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_gate_matches_torch_gate(dtype, replace_s, monkeypatch):
    """Both forms of the gate's running top-k (S rounds per chunk; the replacement scan and a final sort)."""
    from moba.triton import gate as triton_gate
    monkeypatch.setattr(triton_gate, "GATE_REPLACE_S", replace_s)
    q, k, v, extra = make_inputs([150, 3, 90], [150, 3, 90], 4, 2, 32, dtype=dtype, device=DEVICE)
    for topk in (2, 4, 7, 17):
        lay, _ = validate(q, k, v, 8, topk, **extra)
        lt = lay.tensors(q.device)
        want = gate.select_past_blocks(pack(q), pack(k), lay, lt, topk)
        got = triton_gate.select_past_blocks(pack(q), pack(k), lay, lt, topk)
        # the same blocks; the order of two scores equal to ~1e-7 may differ
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)
        assert (got[..., 0] == want[..., 0]).float().mean() > 0.99


# The gate takes one program per query tile and kv head (`_gate_topk_g`) for sequences of at most GATE_SHARED_BLOCKS
# blocks, else one per query tile and head (`_gate_topk`, in chunks of GATE_SHARED_BLOCKS - 1 blocks). Lowering the
# limit to 17 sends sequences of 18 or more blocks to the per-head form, in chunks of 16 blocks.
GATE_FORMS = [pytest.param(None, id="per_kv_head"), pytest.param(17, id="per_head")]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_gate_by_kv_head_matches_per_head(dtype, monkeypatch):
    """The gate by kv head gives the same selection, bitwise, as one program per head; block counts on both sides
    of its limit (19, 19, 10 and 38 blocks in the longest sequence: past the lowered limit of 17 the per-head gate
    runs in chunks of 16 blocks; past the default one, in chunks of 32)."""
    from moba.triton import gate as triton_gate
    q, k, v, extra = make_inputs([150, 3, 90], [150, 3, 90], 6, 2, 32, dtype=dtype, device=DEVICE)
    for bs, topk in ((8, 2), (8, 4), (16, 7), (4, 5)):
        lay, _ = validate(q, k, v, bs, topk, **extra)
        lt = lay.tensors(q.device)
        got = []
        for limit in (17, triton_gate.GATE_SHARED_BLOCKS):
            with monkeypatch.context() as m:
                m.setattr(triton_gate, "GATE_SHARED_BLOCKS", limit)
                got.append(triton_gate.select_past_blocks(pack(q), pack(k), lay, lt, topk))
        assert torch.equal(got[0], got[1])


@pytest.mark.parametrize("backend", backends("triton", "gluon"))
@pytest.mark.parametrize("limit", GATE_FORMS)
def test_triton_gate_counts_the_grouping(backend, limit, monkeypatch):
    """The forward's gate counts each chosen entry for the grouping (no counting pass): the same output, bitwise,
    as with the grouping's own counting pass, over several query chunks of more than 1024 entries each (so that
    the counters' copies matter), packed sequences of different lengths; and the fp64 reference's. Both forms of
    the gate."""
    from moba.triton import fwd, gate as triton_gate
    if limit is not None:
        monkeypatch.setattr(triton_gate, "GATE_SHARED_BLOCKS", limit)
    monkeypatch.setattr(fwd, "SELECT_BYTES", 1)
    monkeypatch.setattr(fwd, "FILL_BYTES", 0)
    q, k, v, extra = make_inputs([300, 170, 5], [300, 170, 5], 8, 2, 16, dtype=torch.float32, device=DEVICE)
    outs = []
    grouped = fwd.group_entries
    for recount in (True, False):
        with monkeypatch.context() as m, torch.no_grad():
            if recount:     # the gate's counters ignored: the grouping counts the selection itself
                m.setattr(fwd, "group_entries", lambda *a, cnt=None, **kw: grouped(*a, **kw))
            outs.append(moba.moba_attention(q, k, v, 16, 5, backend=backend, return_lse=True, **extra))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    check_against_reference(q, k, v, 16, 5, backend, 2e-4, extra)

