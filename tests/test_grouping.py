"""The tables the Triton (and Gluon) kernels read: the chosen (row, slot) entries grouped by key block with a counting
sort on the device (`moba.triton.grouping.group_entries`) against a plain torch sort, and the Gluon own-block
kernel's work list (`moba.triton.fwd._own_tiles`)."""
import pytest
import torch

from helpers import DEVICE, make_inputs, needs_triton
from moba.layout import validate

pytestmark = needs_triton


def _groups_in_torch(sel, Hkv, NB, BM, by_slot):
    """group_entries' bookkeeping in plain torch: sort keys, group offsets, tiles before each group,
    and each tile's group and first entry."""
    n, Hq, S = sel.shape
    G, NG = Hq // Hkv, Hkv * NB
    NK = S * NG if by_slot else NG
    slot = (torch.arange(S, device=DEVICE)[None, None, :] if by_slot
            else torch.zeros(1, 1, 1, dtype=torch.long, device=DEVICE))
    key = torch.where(sel >= 0, slot * NG + sel + (torch.arange(Hq, device=DEVICE) // G * NB)[None, :, None], NK)
    key = key.reshape(-1)
    off = torch.searchsorted(key.sort().values, torch.arange(NK + 1, device=DEVICE, dtype=key.dtype))
    tiles = (off.diff() + BM - 1) // BM
    cum = torch.cat([tiles.new_zeros(1), tiles.cumsum(0)])
    i = torch.arange(-(-n * Hq * S // BM) + NK, device=DEVICE)
    g = torch.searchsorted(cum[1:], i, right=True).clamp(max=NK - 1)
    e0 = torch.where(i < cum[-1], off[g] + (i - cum[g]) * BM, off[g + 1])
    return key, NK, off, cum, g, e0


# n rows, Hq, Hkv, S slots, NB blocks, BM rows per tile
GROUP_CASES = {
    "n100-S3": (100, 4, 2, 3, 7, 16),
    "one-row": (1, 2, 1, 1, 2, 128),
    "n300-1100-blocks": (300, 8, 2, 5, 1100, 32),
    "no-rows": (0, 4, 2, 2, 5, 16),
    "mha-BM64": (64, 4, 4, 2, 3, 64),
}
group_cases = pytest.mark.parametrize("n,Hq,Hkv,S,NB,BM", GROUP_CASES.values(), ids=GROUP_CASES.keys())


@group_cases
@pytest.mark.parametrize("spans", [8, 0], ids=["scan1", "scan_split"])
def test_grouping_stable_matches_a_torch_sort(n, Hq, Hkv, S, NB, BM, spans, monkeypatch):
    """group_entries with ``stable`` (the deterministic backward: a stable sort) against plain torch; its
    scan in one program and split over spans of groups."""
    from moba.triton import grouping
    monkeypatch.setattr(grouping, "SCAN_SPANS", spans)
    sel = torch.randint(-1, NB, (n, Hq, S), dtype=torch.int32, device=DEVICE)
    key, NK, want_off, want_cum, want_g, want_e0 = _groups_in_torch(sel, Hkv, NB, BM, False)
    _, want_ent = torch.sort(key, stable=True)
    ent, off, tile_g, tile_e0, tile_cum = grouping.group_entries(sel, Hkv, NB, BM, by_slot=False, stable=True)
    for got, want in ((ent, want_ent), (off, want_off), (tile_cum, want_cum), (tile_g, want_g), (tile_e0, want_e0)):
        assert torch.equal(got.long().cpu(), want.long().cpu())


@group_cases
@pytest.mark.parametrize("copies,by_slot,spans", [(8, True, 8), (1, True, 8), (8, False, 8), (8, True, 0),
                                                  (1, True, 0)],
                         ids=["by_slot", "by_slot-one-copy", "by_block", "by_slot-scan_split",
                              "by_slot-one-copy-scan_split"])
def test_counting_sort_matches_a_torch_sort(n, Hq, Hkv, S, NB, BM, copies, by_slot, spans, monkeypatch):
    """group_entries' counting sort (by (slot, kv head, block) for the forward) against plain torch:
    the same groups with the same members (their order inside a group is free), offsets and tile table;
    with 8 copies of the counters and with one (used for very many groups); and by (kv head, block) only,
    as the backward groups them; the scan in one program and split over spans of groups. By slot, also
    the flat tile table (first entry, end entry, the block's first and end key) the Gluon forward reads."""
    from moba.triton import grouping
    monkeypatch.setattr(grouping, "PLACE_COPIES", copies)
    monkeypatch.setattr(grouping, "SCAN_SPANS", spans)
    sel = torch.randint(-1, NB, (n, Hq, S), dtype=torch.int32, device=DEVICE)
    key, NK, want_off, want_cum, want_g, want_e0 = _groups_in_torch(sel, Hkv, NB, BM, by_slot)
    starts = torch.randint(0, 1000, (NB,), device=DEVICE).cumsum(0)
    blocks = (starts, starts + torch.randint(1, 500, (NB,), device=DEVICE)) if by_slot else None
    ent, off, tile_g, tile_e0, tile_cum, *tinfo = grouping.group_entries(sel, Hkv, NB, BM, by_slot=by_slot,
                                                                         blocks=blocks)
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


@pytest.mark.parametrize("lens_q,lens_k,bs", [([3001], [3001], 128), ([700, 1, 1500, 90], [700, 1, 1500, 90], 96),
                                              ([300, 17, 1, 0], [900, 400, 64, 5], 64), ([200], [1000], 448)],
                         ids=["T3001-block128", "packed-block96", "Tq-under-Tk-empty-seq", "block448"])
def test_own_tiles_cover_every_row_once_inside_one_block(lens_q, lens_k, bs):
    """The Gluon own-block kernel's work list (the kernel itself runs in test_forward.py on sm_90): every query row in
    exactly one tile of <= 128 rows, all rows of a tile in the same own block (the kernel reads one block start per
    tile), longest tiles (most keys up to the last row) first; each tile's sequence's first block."""
    from moba.triton import fwd
    q, k, v, extra = make_inputs(lens_q, lens_k, 2, 1, 16, dtype=torch.float32, device="cpu")
    lay, _ = validate(q, k, v, bs, 3, **extra)
    q0, q1, p0, kb, fb = (x.tolist() for x in fwd._own_tiles(lay, "cpu"))
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
