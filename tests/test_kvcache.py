"""moba_attention_with_kvcache: contiguous and paged caches, appends in place, key sums beside the pages, against
the fp64 reference run on each sequence's keys (moba.naive_moba_attention with Tq < Tk)."""
import pytest
import torch

import moba
from helpers import backends, device_of, rel_err

BACKENDS = [b for b in backends() if b in ("torch", "triton")]


def _setup(B, lens, Tq, Hq, Hkv, D, page_size, dtype, max_pages=None, seed=0):
    """Sequences of ``lens`` keys (before the Tq new ones) in a contiguous cache, or in a paged one whose pages are
    shuffled (a sequence's pages are not in order in memory), plus their whole keys for the reference."""
    g = torch.Generator().manual_seed(seed)
    total = [L + Tq for L in lens]
    keys = [torch.randn(L, Hkv, D, generator=g, dtype=torch.float64) for L in total]
    vals = [torch.randn(L, Hkv, D, generator=g, dtype=torch.float64) for L in total]
    q = torch.randn(B, Tq, Hq, D, generator=g, dtype=torch.float64)
    if page_size is None:
        Tmax = max(total) + 5
        kc = torch.randn(B, Tmax, Hkv, D, generator=g, dtype=torch.float64)       # garbage past the lengths
        vc = torch.randn(B, Tmax, Hkv, D, generator=g, dtype=torch.float64)
        for b, L in enumerate(lens):
            kc[b, :L], vc[b, :L] = keys[b][:L], vals[b][:L]
        bt = None
    else:
        per = [-(-L // page_size) for L in total]
        n_pages = sum(per) + 3
        perm = torch.randperm(n_pages, generator=g)
        kc = torch.randn(n_pages, page_size, Hkv, D, generator=g, dtype=torch.float64)
        vc = torch.randn(n_pages, page_size, Hkv, D, generator=g, dtype=torch.float64)
        bt = torch.full((B, max_pages or max(per)), n_pages + 7, dtype=torch.int32)   # unused entries: out of range
        off = 0
        for b, L in enumerate(lens):
            pages = perm[off:off + per[b]]
            off += per[b]
            bt[b, :per[b]] = pages.to(torch.int32)
            for j in range(-(-L // page_size)):
                n = min(page_size, L - j * page_size)
                kc[pages[j], :n] = keys[b][j * page_size:j * page_size + n]
                vc[pages[j], :n] = vals[b][j * page_size:j * page_size + n]
    k_new = torch.stack([k[-Tq:] for k in keys])
    v_new = torch.stack([v[-Tq:] for v in vals])
    cast = lambda x: x.to(dtype)  # noqa: E731
    return (cast(q), cast(kc), cast(vc), torch.tensor(lens, dtype=torch.int32), bt, cast(k_new), cast(v_new),
            keys, vals)


def _reference(q, keys, vals, block_size, topk):
    outs = []
    for b in range(q.shape[0]):
        outs.append(moba.naive_moba_attention(q[b:b + 1].double(), keys[b][None], vals[b][None], block_size, topk))
    return torch.cat(outs)


CASES = [  # (id, B, lens before appending, Tq, Hq, Hkv, D, block, topk, page size)
    ("decode-contig", 3, [37, 100, 64], 1, 4, 2, 16, 16, 3, None),
    ("decode-paged", 3, [37, 100, 64], 1, 4, 2, 16, 16, 3, 8),
    ("spec3-paged-odd-heads", 2, [50, 19], 3, 6, 2, 16, 8, 2, 4),
    ("chunk-contig-topk1", 2, [30, 61], 5, 4, 4, 16, 8, 1, None),
    ("chunk-paged-dense", 2, [30, 61], 5, 4, 2, 16, 8, 100, 8),
    ("prefill-paged", 2, [0, 3], 12, 4, 2, 16, 8, 2, 4),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sums", ["key_sums", "no_sums"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kvcache_against_reference(case, sums, backend):
    _, B, lens, Tq, Hq, Hkv, D, bs, topk, ps = case
    if backend == "triton" and not torch.cuda.is_available() and Tq > 3 and (sums == "no_sums" or topk > 8):
        pytest.skip("the interpreter runs one program per query: long chunks once (key sums given, a real gate)")
    dtype = torch.float64 if backend == "torch" else torch.float32
    q, kc, vc, seqlens, bt, k_new, v_new, keys, vals = _setup(B, lens, Tq, Hq, Hkv, D, ps, dtype)
    q, kc, vc, seqlens, bt, k_new, v_new = (None if x is None else x.to(device_of(backend))
                                            for x in (q, kc, vc, seqlens, bt, k_new, v_new))
    key_sums = moba.cache_key_sums(kc, bs, cache_seqlens=seqlens, block_table=bt) if sums == "key_sums" else None
    out, lse = moba.moba_attention_with_kvcache(q, kc, vc, bs, topk, cache_seqlens=seqlens, block_table=bt,
                                                k_new=k_new, v_new=v_new, key_sums=key_sums, return_lse=True,
                                                backend=backend)
    want = _reference(q.cpu(), keys, vals, bs, topk)
    assert out.shape == want.shape and lse.shape == (B, Tq, Hq)
    assert rel_err(out.cpu(), want) < (1e-10 if dtype == torch.float64 else 2e-5)
    if sums == "key_sums":     # the appended keys were added into the sums: the same as building them anew
        after = moba.cache_key_sums(kc, bs, cache_seqlens=seqlens + Tq, block_table=bt)
        assert torch.allclose(key_sums, after, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_cfg,long_len", [(None, 30), ((0,), 30), ((1, 16, 0, 2), 300)],
                         ids=["default", "gate-per-split", "2-gate-programs"])
def test_kvcache_decode_loop_grows_in_place(backend, gate_cfg, long_len, monkeypatch):
    """A decode loop: each step appends one key to the paged cache and its sums, the lengths grow on the device;
    every step equals the reference on the keys so far. Triton: with the gate in its own launch whose list the
    splits share out (the default), in every split, and in two programs per sequence and kv head then a merge (a
    sequence of 38 blocks there: the second program scores the chunk of blocks 16-31)."""
    if gate_cfg is not None:
        if backend != "triton":
            pytest.skip("a launch config of the Triton decode kernel")
        from moba.triton import configs
        monkeypatch.setitem(configs.CONFIG, "decode", configs.DECODE_DEFAULT[:6] + gate_cfg)
    dtype = torch.float64 if backend == "torch" else torch.float32
    bs, topk, ps, steps = 8, 3, 4, 6
    q, kc, vc, seqlens, bt, _, _, keys, vals = _setup(2, [13, long_len], steps, 4, 2, 16, ps, dtype,
                                                      max_pages=long_len // ps + 5)
    dev = device_of(backend)
    q, kc, vc, bt = (x.to(dev) for x in (q, kc, vc, bt))
    # the cache holds the first lengths; the steps' keys come one at a time
    key_sums = moba.cache_key_sums(kc, bs, cache_seqlens=seqlens.to(dev), block_table=bt)
    for t in range(steps):
        k_new = torch.stack([k[seqlens[b] + t:seqlens[b] + t + 1] for b, k in enumerate(keys)]).to(dev, dtype)
        v_new = torch.stack([v[seqlens[b] + t:seqlens[b] + t + 1] for b, v in enumerate(vals)]).to(dev, dtype)
        lens_t = (seqlens + t).to(dev)
        out = moba.moba_attention_with_kvcache(q[:, t:t + 1], kc, vc, bs, topk, cache_seqlens=lens_t, block_table=bt,
                                               k_new=k_new, v_new=v_new, key_sums=key_sums, backend=backend)
        ks = [k[:seqlens[b] + t + 1] for b, k in enumerate(keys)]
        vs = [v[:seqlens[b] + t + 1] for b, v in enumerate(vals)]
        assert rel_err(out.cpu(), _reference(q[:, t:t + 1].cpu(), ks, vs, bs, topk)) < (1e-10 if dtype == torch.float64 else 2e-5)


def test_kvcache_rejects_bad_arguments():
    q, kc, vc, seqlens, bt, k_new, v_new, _, _ = _setup(2, [10, 20], 1, 4, 2, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="multiple of the page size"):
        moba.moba_attention_with_kvcache(q, kc, vc, 6, 2, cache_seqlens=seqlens, block_table=bt)
    with pytest.raises(ValueError, match="cache_seqlens"):
        moba.moba_attention_with_kvcache(q, kc, vc, 8, 2, cache_seqlens=seqlens[:1], block_table=bt)
    with pytest.raises(ValueError, match="k_new and v_new"):
        moba.moba_attention_with_kvcache(q, kc, vc, 8, 2, cache_seqlens=seqlens, block_table=bt, k_new=k_new)
    with pytest.raises(ValueError, match="key_sums"):
        moba.moba_attention_with_kvcache(q, kc, vc, 8, 2, cache_seqlens=seqlens, block_table=bt,
                                         key_sums=torch.zeros(3, 2, 16))
    with pytest.raises(ValueError, match="block_table"):
        moba.moba_attention_with_kvcache(q, kc, vc, 8, 2, cache_seqlens=seqlens, block_table=bt[0])
    with pytest.raises(ValueError, match="k_new must have its cache's dtype"):
        moba.moba_attention_with_kvcache(q, kc, vc, 8, 2, cache_seqlens=seqlens, block_table=bt, k_new=k_new.double(),
                                         v_new=v_new)
    # another device than q's: every rank of a serving engine gets this error, not a kernel reading garbage
    for name in ("cache_seqlens", "block_table", "key_sums", "v_new"):
        args = dict(cache_seqlens=seqlens, block_table=bt, k_new=k_new, v_new=v_new,
                    key_sums=torch.zeros(kc.shape[0], 2, 16))
        args[name] = args[name].to("meta")
        with pytest.raises(ValueError, match=f"{name} must be on q's device"):
            moba.moba_attention_with_kvcache(q, kc, vc, 8, 2, **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kvcache_decode_steps_replay_as_a_cuda_graph():
    """A captured decode step (append, sums, attention) replayed as the lengths grow equals eager steps."""
    dev, bs, topk, ps, steps = "cuda", 64, 3, 16, 5
    q, kc, vc, seqlens, bt, _, _, keys, vals = _setup(2, [300, 700], steps, 8, 2, 64, ps, torch.bfloat16,
                                                      max_pages=64)
    q, kc, vc, bt = (x.to(dev) for x in (q, kc, vc, bt))
    kc2, vc2 = kc.clone(), vc.clone()
    lens = seqlens.to(dev)
    sums = moba.cache_key_sums(kc, bs, cache_seqlens=lens, block_table=bt)
    sums2 = sums.clone()
    new_k = [torch.stack([k[seqlens[b] + t:seqlens[b] + t + 1] for b, k in enumerate(keys)]).to(dev, torch.bfloat16)
             for t in range(steps)]
    new_v = [torch.stack([v[seqlens[b] + t:seqlens[b] + t + 1] for b, v in enumerate(vals)]).to(dev, torch.bfloat16)
             for t in range(steps)]
    eager = [moba.moba_attention_with_kvcache(q[:, t:t + 1], kc2, vc2, bs, topk, cache_seqlens=lens + t,
                                              block_table=bt, k_new=new_k[t], v_new=new_v[t], key_sums=sums2,
                                              backend="triton") for t in range(steps)]
    s_q, s_k, s_v, s_len = q[:, :1].clone(), new_k[0].clone(), new_v[0].clone(), lens.clone()
    step = lambda: moba.moba_attention_with_kvcache(s_q, kc, vc, bs, topk, cache_seqlens=s_len,  # noqa: E731
                                                    block_table=bt, k_new=s_k, v_new=s_v, key_sums=sums,
                                                    backend="triton")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):      # warm-up (compiles) on a copy of the state, then restore it
        kc_b, vc_b, sums_b = kc.clone(), vc.clone(), sums.clone()
        step()
        kc.copy_(kc_b)
        vc.copy_(vc_b)
        sums.copy_(sums_b)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for t in range(steps):
        s_q.copy_(q[:, t:t + 1])
        s_k.copy_(new_k[t])
        s_v.copy_(new_v[t])
        s_len.copy_(lens + t)
        graph.replay()
        assert torch.equal(out, eager[t])


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (a GPU, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("paged", [False, True], ids=["contig", "paged"])
def test_kvcache_append_kernel_matches_torch_ops(paged):
    """The one-launch append (rows and key sums) writes what the torch ops write; past APPEND_MAX_TQ new rows it
    declines and the caller falls back to the torch ops."""
    from moba.kvcache import _append
    from moba.triton import decode
    Tq = 3
    q, kc, vc, seqlens, bt, k_new, v_new, _, _ = _setup(3, [37, 100, 64], Tq, 4, 2, 16, 4 if paged else None,
                                                        torch.float32)
    dev = device_of("triton")
    kc, vc, seqlens, k_new, v_new = (x.to(dev) for x in (kc, vc, seqlens, k_new, v_new))
    bt = None if bt is None else bt.to(dev)
    sums = moba.cache_key_sums(kc, 8, cache_seqlens=seqlens, block_table=bt)
    want = [kc.clone(), vc.clone(), sums.clone()]
    _append(*want[:2], k_new, v_new, seqlens, bt, want[2], 8)
    got = [kc.clone(), vc.clone(), sums.clone()]
    assert decode.append(*got[:2], k_new, v_new, seqlens, bt, got[2], 8)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.allclose(got[2], want[2], atol=1e-5, rtol=0)
    big = decode.APPEND_MAX_TQ + 1
    assert not decode.append(kc, vc, k_new[:, :1].expand(-1, big, -1, -1), v_new[:, :1].expand(-1, big, -1, -1),
                             seqlens, bt, sums, 8)
