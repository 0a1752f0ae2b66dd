"""MoBA against a KV cache, contiguous or paged, shaped like flash-attn's ``flash_attn_with_kvcache``: what a
serving engine calls for decode steps, speculative tokens and chunked prefill.

The gate's state lives beside the cache: ``key_sums``, fp32 sums of the keys, one row per page of a paged cache
([num_pages, Hkv, D]) or per block of a contiguous one ([B, ceil(Tmax / block_size), Hkv, D]). Appending keys adds
them in, so a step never re-reads the cache to score its blocks; shared (prefix) pages keep valid sums, since a
page's sum depends on its contents alone.
"""
from __future__ import annotations

import torch

from .api import resolve_backend
from .layout import check_args, check_gate

__all__ = ["moba_attention_with_kvcache", "cache_key_sums"]


def _check(q, k_cache, v_cache, block_size, topk, cache_seqlens, block_table, k_new, v_new, key_sums, scale,
           backend):
    """ValueErrors naming the argument; returns (paged, page_size, scale). Reads no tensor values."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    B, Tq, Hq, D = q.shape
    paged = block_table is not None
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != B or \
                block_table.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"block_table must be an int32 tensor [B={B}, max_pages_per_seq], got "
                             f"{getattr(block_table, 'shape', None)} {getattr(block_table, 'dtype', None)}")
        page_size = k_cache.shape[1]
        if block_size % page_size:
            raise ValueError(f"block_size ({block_size}) must be a multiple of the page size ({page_size}, dim 1 of "
                             f"k_cache [num_pages, page_size, Hkv, D]): a MoBA block is a run of whole pages")
    else:
        page_size = 0
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache [B, Tmax, Hkv, D] must have q's batch size {B}, got {tuple(k_cache.shape)} "
                             f"(pass block_table for a paged cache [num_pages, page_size, Hkv, D])")
    if k_cache.shape != v_cache.shape[:3] + (k_cache.shape[3],) or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"k_cache and v_cache must agree in all but the last dim, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (B,) or \
            cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cache_seqlens must be an int32 tensor [B={B}] (the lengths before appending), got "
                         f"{getattr(cache_seqlens, 'shape', type(cache_seqlens).__name__)}")
    Hkv = k_cache.shape[2]
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new go together: pass both or neither")
    for name, t, last in (("k_new", k_new, D), ("v_new", v_new, v_cache.shape[3])):
        if t is not None and tuple(t.shape) != (B, Tq, Hkv, last):
            raise ValueError(f"{name} must be [B, Tq, Hkv, D] = {[B, Tq, Hkv, last]} (one new key per query), got "
                             f"{tuple(t.shape)}")
    for name, t, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
        if t is not None and t.dtype != cache.dtype:
            raise ValueError(f"{name} must have its cache's dtype {cache.dtype} (it is written into it), got {t.dtype}")
    # the kernels read these through raw pointers: a tensor on another device would be read as garbage
    for name, t in (("cache_seqlens", cache_seqlens), ("block_table", block_table), ("k_new", k_new),
                    ("v_new", v_new), ("key_sums", key_sums), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {t.device}")
    if key_sums is not None:
        nb = -(-k_cache.shape[1] // block_size)
        want = (k_cache.shape[0], Hkv, D) if paged else (B, nb, Hkv, D)
        if tuple(key_sums.shape) != want or key_sums.dtype != torch.float32:
            raise ValueError(f"key_sums must be float32 {list(want)} ({'per page' if paged else 'per block'}), got "
                             f"{tuple(key_sums.shape)} {key_sums.dtype}; cache_key_sums builds them")
    # the remaining checks of moba_attention's arguments, on a stand-in for the keys
    kk = k_cache[:1, :1].expand(B, max(Tq, 1), Hkv, D)
    vv = v_cache[:1, :1].expand(B, max(Tq, 1), Hkv, v_cache.shape[3])
    sc = check_args(q, kk, vv, block_size, topk, None, None, scale, backend)
    return paged, page_size, sc


def _page_rows(k_cache, cache_seqlens, block_table):
    """How many rows of each page hold keys, as a device tensor."""
    lens = cache_seqlens.long()
    ps = k_cache.shape[1]
    j = torch.arange(block_table.shape[1], device=lens.device)
    valid = (lens[:, None] - j * ps).clamp(0, ps)                       # [B, max_pages] rows used in each page
    count = torch.zeros(k_cache.shape[0], dtype=torch.long, device=lens.device)
    used = valid > 0
    return count.index_put_((block_table.long().clamp(0, k_cache.shape[0] - 1)[used],), valid[used])


def cache_key_sums(k_cache, block_size, *, cache_seqlens, block_table=None) -> torch.Tensor:
    """The ``key_sums`` of an existing cache (after a prefill written by other means): fp32 sums of each page's
    used rows ([num_pages, Hkv, D], paged) or of each block's used rows ([B, ceil(Tmax / block_size), Hkv, D])."""
    if block_table is None:
        B, Tmax, Hkv, D = k_cache.shape
        nb = -(-Tmax // block_size)
        out = torch.empty(B, nb, Hkv, D, dtype=torch.float32, device=k_cache.device)
        lens = cache_seqlens.to(k_cache.device).long()
        step = max(1, (1 << 26) // max(1, B * block_size * Hkv * D))   # blocks per pass: ~256 MiB of fp32 at a time
        for j0 in range(0, nb, step):
            t0, t1 = j0 * block_size, min((j0 + step) * block_size, Tmax)
            nj = -(-(t1 - t0) // block_size)
            t = torch.arange(t0, t1, device=k_cache.device)
            x = k_cache[:, t0:t1].float() * (t[None, :] < lens[:, None])[..., None, None]
            if nj * block_size != t1 - t0:                              # the cache's last block is short
                x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, nj * block_size - (t1 - t0)))
            out[:, j0:j0 + nj] = x.view(B, nj, block_size, Hkv, D).sum(2)
        return out
    count = _page_rows(k_cache, cache_seqlens, block_table)
    r = torch.arange(k_cache.shape[1], device=k_cache.device)
    out = torch.empty(k_cache.shape[0], *k_cache.shape[2:], dtype=torch.float32, device=k_cache.device)
    step = max(1, (1 << 26) // max(1, k_cache[0].numel()))          # pages per pass: ~256 MiB of fp32 at a time
    for p0 in range(0, k_cache.shape[0], step):
        m = (r[None, :] < count[p0:p0 + step, None]).float()[..., None, None]
        out[p0:p0 + step] = (k_cache[p0:p0 + step].float() * m).sum(1)
    return out


def _append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, key_sums, block_size):
    """k_new/v_new written at positions cache_seqlens[b] + i, and added into key_sums; device ops, no sync."""
    B, Tq = k_new.shape[:2]
    pos = cache_seqlens.long()[:, None] + torch.arange(Tq, device=k_new.device)     # [B, Tq]
    if block_table is None:
        b = torch.arange(B, device=k_new.device)[:, None].expand(B, Tq)
        k_cache.index_put_((b, pos), k_new)
        v_cache.index_put_((b, pos), v_new)
        if key_sums is not None:
            key_sums.index_put_((b, pos // block_size), k_new.float(), accumulate=True)
        return
    ps = k_cache.shape[1]
    page = block_table.long().gather(1, pos // ps)                                   # [B, Tq]
    row = (page * ps + pos % ps).flatten()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, row, k_new.flatten(0, 1))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, row, v_new.flatten(0, 1))
    if key_sums is not None:
        key_sums.index_add_(0, page.flatten(), k_new.flatten(0, 1).float())


def moba_attention_with_kvcache(q, k_cache, v_cache, block_size, topk, *, cache_seqlens, block_table=None,
                                k_new=None, v_new=None, key_sums=None, scale=None, return_lse=False,
                                backend="auto", gate="head"):
    """MoBA of new queries against a KV cache (inference: no gradient).

    Args:
        q: [B, Tq, Hq, D], Tq >= 1 new queries per sequence: the last Tq positions of each sequence after
            appending (a decode step, speculative tokens, a chunk of prefill).
        k_cache, v_cache: contiguous [B, Tmax, Hkv, D], or paged [num_pages, page_size, Hkv, D] with
            ``block_table``. ``block_size`` must be a multiple of ``page_size``.
        cache_seqlens: int32 [B] on q's device: each sequence's length BEFORE appending.
        block_table: int32 [B, max_pages_per_seq]: the pages of each sequence, in order (paged caches).
        k_new, v_new: [B, Tq, Hkv, D]: written into the cache in place at positions ``cache_seqlens[b] + i`` (as
            flash-attn does), and added into ``key_sums``; without them the queries' keys are already there.
        key_sums: fp32 [num_pages, Hkv, D] (paged) or [B, ceil(Tmax / block_size), Hkv, D] (contiguous), the sums of
            the keys (``cache_key_sums`` builds them), updated in place when keys are appended; None: computed
            from the cache on every call (slow, correct).
        backend: "torch" (reads the lengths on the host: any device, no CUDA graphs), "triton" / "gluon" (one
            launch with no host synchronisation and launch shapes fixed by (B, Tq, the cache's shape): a step can
            be captured in a CUDA graph and replayed as the lengths grow), "auto" ("triton" on CUDA).
        scale, return_lse, gate: as in :func:`moba.moba_attention`.

    Returns ``out`` [B, Tq, Hq, Dv] (``(out, lse)`` with ``return_lse``), exactly :func:`moba.moba_attention` of
    each sequence's queries against its keys.
    """
    paged, page_size, sc = _check(q, k_cache, v_cache, block_size, topk, cache_seqlens, block_table, k_new, v_new,
                                  key_sums, scale, backend)
    group = check_gate(gate)
    be = resolve_backend(backend, q, v_cache)
    if be == "naive":
        be = "torch"
    with torch.no_grad():
        triton = be in ("triton", "gluon")
        if triton:
            from .triton import decode
        # the Triton append is one launch where it applies; torch ops otherwise
        if k_new is not None and not (triton and decode.append(k_cache, v_cache, k_new, v_new, cache_seqlens,
                                                               block_table, key_sums, block_size)):
            _append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, key_sums, block_size)
        if triton:
            out, lse = decode.kvcache(q, k_cache, v_cache, block_size, topk, cache_seqlens, block_table, key_sums,
                                      sc, group)
        else:
            out, lse = _torch_kvcache(q, k_cache, v_cache, block_size, topk, cache_seqlens, block_table, key_sums,
                                      sc, group)
    return (out, lse) if return_lse else out


def _torch_kvcache(q, k_cache, v_cache, block_size, topk, cache_seqlens, block_table, key_sums, scale, group=False):
    """The torch backend: each sequence's keys gathered (a view for a contiguous cache), every sequence packed into
    one call of the single-device forward, the block means taken from key_sums where given."""
    from .autograd import _forward
    B, Tq, Hq, D = q.shape
    lens = (cache_seqlens.long() + Tq).tolist()
    ks, vs, means = [], [], []
    for b, L in enumerate(lens):
        nb = -(-L // block_size)
        if block_table is None:
            ks.append(k_cache[b, :L])
            vs.append(v_cache[b, :L])
            if key_sums is not None:
                means.append(key_sums[b, :nb] / block_size)
        else:
            ps = k_cache.shape[1]
            pages = block_table[b, :-(-L // ps)].long()
            ks.append(k_cache[pages].flatten(0, 1)[:L])
            vs.append(v_cache[pages].flatten(0, 1)[:L])
            if key_sums is not None:
                ppb = block_size // ps
                sums = key_sums.new_zeros(nb * ppb, *key_sums.shape[1:])
                sums[:pages.numel()] = key_sums[pages]
                means.append(sums.view(nb, ppb, *key_sums.shape[1:]).sum(1) / block_size)
    cu_q = torch.arange(0, B * Tq + 1, Tq, dtype=torch.int32)
    cu_k = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    kp, vp = torch.cat(ks)[None], torch.cat(vs)[None]
    m = torch.cat(means).to(torch.float64 if q.dtype == torch.float64 else torch.float32) if means else None
    out, lse, _ = _forward(q.reshape(1, B * Tq, Hq, D), kp, vp, cu_q, cu_k, block_size, topk, scale, "torch", False, m,
                           group=group)
    return out.view(B, Tq, Hq, -1), lse.view(B, Tq, Hq).float()
