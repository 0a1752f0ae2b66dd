"""Decoding (queries fewer than keys) on every backend this machine runs: the incremental block-means cache, step by
step decoding against the whole sequence and the reference, and the Triton decode kernels (one query per sequence:
packed, and in place in a padded cache)."""
import pytest
import torch

import moba
from helpers import DEVICE, backends, make_inputs, needs_triton, rel_err
from moba.layout import pack, validate
from moba.torch_backend import gate

# Unlike the reference comparisons, the torch backend runs these on the GPU too where there is one (KV caches live
# there).


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


@pytest.mark.parametrize("pool_tile", [1 << 25, 2 * 8 * 2 * 16], ids=["one-pass", "two-blocks-a-pass"])
def test_means_cache_packed_sequences_match_pooling(pool_tile, monkeypatch):
    """Several sequences growing at different rates (packed through cu_seqlens_k): the cached means equal
    a fresh pooling of every complete block, in the layout's block order, after every step (also when
    the new blocks are pooled a few at a time)."""
    from moba import cache as cache_module
    monkeypatch.setattr(cache_module, "POOL_TILE", pool_tile)
    torch.manual_seed(0)
    full = [torch.randn(n, 2, 16, dtype=torch.float64) for n in (70, 5, 130)]
    cache = moba.BlockMeansCache()
    assert cache.means(torch.zeros(0, 2, 16, dtype=torch.float64), 8, [0, 0, 0, 0]).shape == (0, 2, 16)
    lens = [20, 1, 33] if pool_tile > 1000 else [1, 1, 1]
    for _ in range(40):
        k = torch.cat([f[:n] for f, n in zip(full, lens)])
        cu = torch.tensor([0] + lens).cumsum(0)
        got = cache.means(k, 8, cu)
        q = torch.zeros(len(lens), 2, 16, dtype=torch.float64)
        lay, _ = validate(q[None], k[None], k[None], 8, 2, torch.arange(len(lens) + 1), cu)
        want = gate.block_means(k, lay, lay.tensors("cpu"))
        assert got.shape == want.shape
        for i, n in enumerate(lens):                       # complete blocks only; the partial one is unused
            a = lay.blk_off[i]
            torch.testing.assert_close(got[a:a + n // 8], want[a:a + n // 8])
        assert cache.n_keys == sum(lens)
        lens = [min(f.shape[0], n + d) for f, n, d in zip(full, lens, (1, 3, 2))]
    cache.means(torch.cat([f[:2] for f in full]), 8, torch.tensor([0, 2, 4, 6]))   # shorter: a reset
    assert cache.n_keys == 6


@pytest.mark.parametrize("backend", backends("torch", "triton", "gluon"))
def test_token_by_token_decoding_equals_whole_sequence(backend):
    q, k, v, _ = make_inputs([75], [75], 4, 2, 16, dtype=torch.float32, device=DEVICE)
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


@pytest.mark.parametrize("backend", backends("torch", "triton", "gluon"))
def test_batched_decoding_with_cache_equals_reference(backend):
    """Batch decoding of packed sequences (one query each) with a BlockMeansCache, step by step, against
    the fp64 reference on each step's whole cache."""
    torch.manual_seed(1)
    Hq, Hkv, D = 4, 2, 16
    full = [torch.randn(n, Hkv, D, device=DEVICE) for n in (90, 40, 7)]
    qs = [torch.randn(n, Hq, D, device=DEVICE) for n in (90, 40, 7)]
    cache = moba.BlockMeansCache()
    lens = [60, 30, 1]
    for _ in range(12):
        k = torch.cat([f[:n] for f, n in zip(full, lens)])[None]
        q = torch.stack([qq[n - 1] for qq, n in zip(qs, lens)])[None]
        cu_q = torch.arange(len(lens) + 1, device=DEVICE)
        cu_k = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
        with torch.no_grad():
            out = moba.moba_attention(q, k, k, 8, 3, cu_seqlens=cu_q, cu_seqlens_k=cu_k, backend=backend,
                                      means_cache=cache)
        ref = moba.naive_moba_attention(q.double(), k.double(), k.double(), 8, 3, cu_seqlens=cu_q, cu_seqlens_k=cu_k)
        assert rel_err(out, ref) < 1e-4
        lens = [min(f.shape[0], n + 2) for f, n in zip(full, lens)]


@pytest.mark.parametrize("backend", backends("triton", "gluon"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (6, 3), (8, 1)], ids=["G2", "odd-heads", "G8"])
@pytest.mark.parametrize("config", [(8, 64, 64, 4, 2, 512, 0), (8, 64, 64, 4, 2, 8, 0), (4, 4, 16, 4, 3, 32, 0),
                                    (8, 64, 64, 4, 2, 512, 1), (4, 4, 16, 4, 3, 8, 1), (4, 4, 16, 4, 3, 8, 0, 16, 1),
                                    (8, 64, 64, 4, 2, 512, 1, 16, 1), (8, 64, 64, 4, 2, 512, 1, 16, 0, 2)],
                         ids=["block-per-item", "block-split", "steps-per-item", "listed", "listed-split",
                              "replace-split", "listed-replace", "listed-2-gate-programs"])
def test_decode_kernel_matches_reference(backend, dtype, Hq, Hkv, config, monkeypatch):
    """The one-launch decode kernel (one query per sequence, no gradient) against the fp64 reference, under
    launch configs (configs.CONFIG["decode"]) where a work item is a whole 16-key block, half of one (each block
    read by two programs), or two blocks of 16-key steps (the item stops at its block's end) in 4 splits; with
    the gate in its own launch and the splits sharing out its list of chosen blocks ("listed"); with the gate
    keeping its choices by replacement, 16 blocks at a time ("replace")."""
    from moba.triton import configs, decode
    monkeypatch.setitem(configs.CONFIG, "decode", config)
    lens_k = [75, 1, 200, 33]
    q, k, v, extra = make_inputs([1] * 4, lens_k, Hq, Hkv, 16, Dv=32, dtype=dtype, device=DEVICE)
    ref = moba.naive_moba_attention(q.double(), k.double(), v.double(), 16, 4, return_lse=True, **extra)
    low = moba.naive_moba_attention(q, k, v, 16, 4, **extra)
    calls = []
    real = decode.decode
    monkeypatch.setattr(decode, "decode", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    with torch.no_grad():
        out, lse = moba.moba_attention(q, k, v, 16, 4, backend=backend, return_lse=True, **extra)
    assert calls == [1]
    tol = 2e-4 if dtype == torch.float32 else 2 * rel_err(low, ref[0]) + 1e-3
    assert rel_err(out, ref[0]) < tol and rel_err(lse, ref[1]) < 2e-4 + (0 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("backend", backends("triton"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("Hq,Hkv,gate", [(4, 2, "head"), (8, 1, "head"), (6, 2, "group")], ids=["G2", "G8", "group"])
@pytest.mark.parametrize("gate_cfg", [(32, 0), (16, 1), (16, 0, 2), (16, 1, 2), (16, 1, 4)],
                         ids=["rounds", "replace", "rounds-2-programs", "replace-2-programs", "replace-4-programs"])
def test_decode_gate_lists_its_choices_union(backend, dtype, Hq, Hkv, gate, gate_cfg, monkeypatch):
    """The listed walk's gate launch on its own: each query row's choices are the reference gate's (padding rows
    choose nothing), and its list is their union in increasing order, then the own block; the gate ranking 32
    blocks at a time by rounds of max extraction, or 16 at a time by replacement (the longest sequence has 38);
    in one program, or in 2 or 4 side by side whose best blocks a second launch merges (with 2, program 0 scores
    chunks 0 and 2). The interpreter runs a program's threads as one, so the barriers between the list's writes
    and reads are checked on a GPU only."""
    from moba.naive import naive_select
    from moba.triton import configs, decode
    monkeypatch.setitem(configs.CONFIG, "decode", (8, 64, 64, 4, 2, 512, 1) + gate_cfg)
    lens_k, bs, topk = [75, 1, 600, 130], 16, 5
    q, k, v, extra = make_inputs([1] * 4, lens_k, Hq, Hkv, 16, dtype=dtype, device=DEVICE)
    seen = []
    real = decode._gate_lists
    monkeypatch.setattr(decode, "_gate_lists", lambda *a: seen.append(real(*a)) or seen[-1])
    with torch.no_grad():
        moba.moba_attention(q, k, v, bs, topk, backend=backend, gate=gate, **extra)
    (bi, lst, cnt), = seen
    G, cu = Hq // Hkv, [0] + torch.tensor(lens_k).cumsum(0).tolist()
    for n, L in enumerate(lens_k):
        ref = naive_select(q[0, n:n + 1].double(), k[0, cu[n]:cu[n + 1]].double(), bs, topk, gate=gate)[0]
        own = (L - 1) // bs
        for g in range(Hkv):
            want = [sorted(x for x in ref[g * G + r, 1:].tolist() if x >= 0) for r in range(G)]
            got = [sorted(x for x in bi[n, g, r].tolist() if x >= 0) for r in range(bi.shape[2])]
            assert got[:G] == want and not any(got[G:]), (n, g)
            union = sorted(set(sum(want, [])))
            assert cnt[n, g].item() == len(union) + 1 and lst[n, g, :len(union) + 1].tolist() == union + [own], (n, g)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_decode_padded_reads_rows_in_place(dtype):
    """decode_padded: one query per row of a padded cache [B, L, Hkv, D] (strided, as transformers hands
    it over), each row's keys k[b, start:end], against the fp64 reference run on each row alone; the block
    means come from a BlockMeansCache in padded mode, grown step by step."""
    from moba.triton import decode
    torch.manual_seed(3)
    B, L, Hq, Hkv, D, bs, topk = 3, 70, 6, 3, 16, 8, 3
    kh = torch.randn(B, Hkv, L, D, device=DEVICE, dtype=dtype)          # cache layout [B, H, L, D]
    vh = torch.randn(B, Hkv, L, 32, device=DEVICE, dtype=dtype)
    k, v = kh.transpose(1, 2), vh.transpose(1, 2)                      # [B, L, H, D] strided views
    starts = [10, 0, 41]
    cache = moba.BlockMeansCache()
    for end in range(50, 71, 4):
        ends = [end, end, end - 1]
        q = torch.randn(B, Hq, D, device=DEVICE, dtype=dtype)
        means = cache.means(k, bs, starts=starts, ends=ends)
        with torch.no_grad():
            out, lse = decode.decode_padded(q, k, v, starts, ends, bs, topk, D ** -0.5, means)
        for b in range(B):
            kb, vb = k[b:b + 1, starts[b]:ends[b]].double(), v[b:b + 1, starts[b]:ends[b]].double()
            ref, ref_lse = moba.naive_moba_attention(q[b:b + 1, None].double(), kb, vb, bs, topk, return_lse=True)
            tol = 2e-4 if dtype == torch.float32 else 5e-3
            assert rel_err(out[b], ref[0, 0]) < tol and rel_err(lse[b], ref_lse[0, 0]) < tol
    with pytest.raises(ValueError, match="non-empty"):
        decode.decode_padded(q, k, v, [5, 5, 5], [5, 9, 9], bs, topk, 1.0, means)
