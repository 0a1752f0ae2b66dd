"""MoBA as a transformers attention implementation (``attn_implementation="moba"``).

Registration goes through ``AttentionInterface`` and ``AttentionMaskInterface`` (so padding masks
reach us as a boolean [B, 1, Tq, Tk] mask); nothing in transformers is patched. The MoBA settings live in
``model.config.moba`` (a plain dict, so ``save_pretrained``/``from_pretrained`` keep them):

    {"block_size": 512, "topk": 3, "gate": "head" | "group", "full_attention_layers": [...], "decode": "moba" | "full",
     "mode": "moba" | "full", "layer_modes": {"<layer>": "moba" | "full"}, "previous": "<impl>"}

A layer runs dense attention (transformers' own SDPA path, bit for bit) when its mode is "full"; the
mode of layer i is ``layer_modes[i]`` if set, else "full" for the listed full-attention layers, else
``mode``. With ``decode="full"`` the steps whose queries are fewer than the keys (generation with a
cache) run dense attention, the paper's evaluation mode.

Padding: each batch row's real keys and queries are read off the mask; blocks are counted from each
row's first real token, padded keys are never attended or selected, padded query rows get zeros.

Context parallelism: ``enable(model, ..., cp_group=group)`` makes every layer's attention run through
``moba.distributed`` over ``group`` (MoBA layers through ``moba_attention``, full layers through
``dense_attention``): each rank feeds the model its shard of the sequence (``moba.distributed.shard``) with the
matching ``position_ids`` (``moba.distributed.positions``), whole sequences without padding. The group is kept
beside the config (it cannot be saved), keyed by the config object.
"""
from __future__ import annotations

import torch

from ..api import moba_attention, resolve_backend
from ..cache import BlockMeansCache
from ..layout import BACKENDS, check_args, check_gate
from ..utils import to_device

NAME = "moba"
_REGISTERED = False


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("moba.hf needs transformers: pip install 'moba[hf]'") from e


def register() -> None:
    """Register "moba" with transformers' attention and mask interfaces (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, moba_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _REGISTERED = True


def _layer_mode(cfg: dict, layer_idx) -> str:
    modes = cfg.get("layer_modes") or {}
    if layer_idx is not None and str(layer_idx) in modes:
        return modes[str(layer_idx)]
    if layer_idx is not None and layer_idx in (cfg.get("full_attention_layers") or ()):
        return "full"
    return cfg.get("mode", "moba")


def _dense(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


_RANGES: dict = {}


def _real_ranges(mask: torch.Tensor, Tq: int, Tk: int):
    """``_read_ranges``, once per mask tensor: every layer of a forward pass gets the same mask object,
    and reading it costs device syncs."""
    import weakref
    hit = _RANGES.get(id(mask))
    if hit is not None and hit[0]() is mask and hit[1] == (mask._version, Tq, Tk):
        return hit[2]
    ranges = _read_ranges(mask, Tq, Tk)
    _RANGES.clear()                     # keep only the current pass's mask
    _RANGES[id(mask)] = (weakref.ref(mask), (mask._version, Tq, Tk), ranges)
    return ranges


def _read_ranges(mask: torch.Tensor, Tq: int, Tk: int):
    """Per batch row: (first real key, end of real keys, first real query row, end of real query rows).

    A real query sees one more key than the real query before it; padded query rows see nothing (left
    padding) or the same keys as the last real row (right padding) and get zeros. Checks that the real
    rows' mask is causal over one contiguous run of real keys with the real queries at its end (what
    padding, static caches and chunked prefill produce); anything else gets a ValueError.
    """
    m = mask[:, 0] if mask.dim() == 4 else mask                              # [B, Tq, Tk]
    if m.dtype != torch.bool:
        m = m == 0 if m.is_floating_point() and (m <= 0).all() else m.bool()  # additive 0/-inf masks
    m = m.expand(m.shape[0], Tq, Tk)
    ar_k = torch.arange(Tk, device=m.device)
    last = torch.where(m, ar_k, -1).amax(-1)                                 # [B, Tq] last visible key
    prev = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], 1)
    q_real = (last >= 0) & (last > prev)
    key_real = m.any(1)                                                      # [B, Tk]
    out = []
    for b in range(m.shape[0]):
        kr = key_real[b].nonzero().flatten()
        qr = q_real[b].nonzero().flatten()
        if kr.numel() == 0 or qr.numel() == 0:
            out.append((0, 0, 0, 0))
            continue
        ks, ke, qs, qe = int(kr[0]), int(kr[-1]) + 1, int(qr[0]), int(qr[-1]) + 1
        nq, nk = qe - qs, ke - ks
        # real query i (of nq) must see exactly the real keys ks .. ke - nq + i
        want = (ar_k[None, :] <= (ke - nq + torch.arange(nq, device=m.device))[:, None]) & (ar_k[None, :] >= ks)
        if kr.numel() != nk or qr.numel() != nq or nq > nk or not torch.equal(m[b, qs:qe], want):
            raise ValueError("MoBA attention needs a causal mask over one contiguous run of real tokens per row "
                             "(left/right padding, static caches); got another mask pattern")
        out.append((ks, ke, qs, qe))
    return out


def _means_cache(module, n_q: list, n_k: list):
    """The layer's incremental block-means cache for inference (one entry per sequence), else None.

    It is trusted only when every sequence's keys are exactly the previous call's keys plus this call's
    queries (generation and chunked prefill); anything else starts it afresh."""
    if torch.is_grad_enabled():
        return None
    cache = getattr(module, "_moba_means_cache", None)
    if cache is None:
        cache = module._moba_means_cache = BlockMeansCache()
    prev = cache.seq_lens
    if len(prev) != len(n_q) or any(p + q != k for p, q, k in zip(prev, n_q, n_k)):
        cache.reset()
    return cache


def _padded_decode_ok(q, v, topk: int, backend: str) -> bool:
    """Whether a padded batch's generation step can go to the decode kernel in place (inference only)."""
    if torch.is_grad_enabled() or topk < 2 or resolve_backend(backend, q, v) not in ("triton", "gluon"):
        return False
    from ..triton.common import supports          # Triton is importable here: resolve_backend checked it
    return supports(q, v)


_CP: dict = {}   # id(model.config) -> (group, layout, scheme) of the models enabled with a cp_group


def _context_parallel(module, cp, cfg, layer, query, key, value, attention_mask, dropout, scaling):
    """A layer's attention over this rank's shard of a sequence split across ``cp``'s group."""
    from .. import distributed as md
    group, layout, scheme = cp
    if key.shape[2] != query.shape[2]:
        raise ValueError("with cp_group the model runs whole sharded sequences (training, prefill): no KV cache; got "
                         f"{query.shape[2]} queries against {key.shape[2]} keys")
    if dropout and dropout > 0:
        raise ValueError(f"MoBA attention does not implement attention dropout (got {dropout})")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    if _layer_mode(cfg, layer) == "full":
        return md.dense_attention(q, k, v, group=group, layout=layout, scheme=scheme, scale=scaling), None
    return md.moba_attention(q, k, v, int(cfg["block_size"]), int(cfg["topk"]), group=group, layout=layout,
                             scheme=scheme, scale=scaling, backend=cfg.get("backend", "auto"),
                             gate=cfg.get("gate", "head")), None


def moba_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D] -> ([B, Tq, Hq, D], None)."""
    cfg = getattr(module.config, "moba", None)
    if not cfg:
        raise ValueError("attn_implementation='moba' needs model.config.moba: call moba.hf.enable(model, ...)")
    layer = getattr(module, "layer_idx", None)
    cp = _CP.get(id(module.config))
    from .generation import cache_attention, handed_cache
    kv = handed_cache(layer, key)
    if kv is not None:      # a MobaCache handed these keys out: append them and read the cache
        if cp is not None:
            raise ValueError("MobaCache does not run context-parallel: enable the model without cp_group to generate")
        if dropout and dropout > 0:
            raise ValueError(f"MoBA attention does not implement attention dropout (got {dropout})")
        return cache_attention(module, kv, cfg, _layer_mode(cfg, layer) == "full", query, key, value, scaling), None
    if cp is not None:     # the mask transformers built is for the local shard alone: the global one is causal
        return _context_parallel(module, cp, cfg, layer, query, key, value, attention_mask, dropout, scaling)
    if _layer_mode(cfg, layer) == "full":
        return _dense(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if dropout and dropout > 0:
        raise ValueError(f"MoBA attention does not implement attention dropout (got {dropout}); set the model's "
                         f"attention_dropout to 0 or use full attention for this layer")
    bs, topk, be, gate = int(cfg["block_size"]), int(cfg["topk"]), cfg.get("backend", "auto"), cfg.get("gate", "head")
    B, Hq, Tq, D = query.shape
    Tk = key.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))              # [B, T, H, D] views, no copy
    decode_full = cfg.get("decode", "moba") == "full"
    if not getattr(module, "is_causal", True):
        raise ValueError("MoBA is causal attention; this attention module is not causal")
    if attention_mask is None:
        # transformers skips the mask exactly where SDPA's is_causal is right: one query reads every key;
        # several queries are aligned top-left (a static cache whose first Tq slots are the tokens)
        if Tq > 1 and Tq < Tk:
            k, v = k[:, :Tq], v[:, :Tq]
        if decode_full and Tq < k.shape[1]:
            return _dense(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        return moba_attention(q, k, v, bs, topk, scale=scaling, backend=be, gate=gate,
                              means_cache=_means_cache(module, [Tq] * B, [k.shape[1]] * B)), None
    ranges = _real_ranges(attention_mask, Tq, Tk)
    if decode_full and any(qe - qs < ke - ks for ks, ke, qs, qe in ranges if qe > qs):
        return _dense(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if B == 1 and ranges[0] == (0, Tk, Tq - min(Tq, Tk), Tq) and Tq <= Tk:
        return moba_attention(q, k, v, bs, topk, scale=scaling, backend=be, gate=gate,
                              means_cache=_means_cache(module, [Tq], [Tk])), None
    out = query.new_zeros(B, Tq, Hq, value.shape[3])
    if B == 1:   # one row: its real tokens are a slice (views, no copy); e.g. a static cache's used slots
        ks, ke, qs, qe = ranges[0]
        if qe > qs:
            kk = k[:, ks:ke]
            out[:, qs:qe] = moba_attention(q[:, qs:qe], kk, v[:, ks:ke], bs, topk, scale=scaling, backend=be,
                                           gate=gate, means_cache=_means_cache(module, [qe - qs], [ke - ks]))
        return out, None
    # pack each row's real tokens as one sequence (rows without a real query are left out)
    rows = [(b, r) for b, r in enumerate(ranges) if r[3] > r[2]]
    if not rows:
        return out, None
    if len(rows) == B and all(qe - qs == 1 for _, (ks, ke, qs, qe) in rows) and _padded_decode_ok(q, v, topk, be):
        # generation step of a padded batch: the decode kernel reads every row's real keys in place
        sc = check_args(q[:, :1], k, v, bs, topk, None, None, scaling, be)
        starts, ends = [r[0] for _, r in rows], [r[1] for _, r in rows]
        cache = _means_cache(module, [1] * B, [e - s for s, e in zip(starts, ends)])
        # (row, query slot) of every row's one query: one gather and one scatter, not a copy per row
        bi, qi = to_device(torch.tensor([[b for b, _ in rows], [r[2] for _, r in rows]]), q.device)
        with torch.no_grad():
            means = cache.means(k.detach(), bs, starts=starts, ends=ends)
            from ..triton import decode
            o, _ = decode.decode_padded(q[bi, qi], k, v, starts, ends, bs, topk, sc, means, gate == "group")
        out[bi, qi] = o
        return out, None
    qp = torch.cat([q[b, qs:qe] for b, (ks, ke, qs, qe) in rows])[None]
    kp = torch.cat([k[b, ks:ke] for b, (ks, ke, qs, qe) in rows])[None]
    vp = torch.cat([v[b, ks:ke] for b, (ks, ke, qs, qe) in rows])[None]
    off_q, off_k = [0], [0]
    for _, (ks, ke, qs, qe) in rows:
        off_q.append(off_q[-1] + qe - qs)
        off_k.append(off_k[-1] + ke - ks)
    cu_q = torch.tensor(off_q, dtype=torch.int32)    # host offsets: moba_attention reads them without a device sync
    cu_k = torch.tensor(off_k, dtype=torch.int32)
    cache = _means_cache(module, [qe - qs for _, (ks, ke, qs, qe) in rows], [ke - ks for _, (ks, ke, qs, qe) in rows])
    o = moba_attention(qp, kp, vp, bs, topk, cu_seqlens=cu_q, cu_seqlens_k=cu_k, scale=scaling, backend=be,
                       means_cache=cache, gate=gate)[0]
    for i, (b, (_, _, qs, qe)) in enumerate(rows):
        out[b, qs:qe] = o[off_q[i]:off_q[i + 1]]
    return out, None


# ------------------------------------------------------------------------------------------------------
# public switches
# ------------------------------------------------------------------------------------------------------
def enable(model, *, block_size=None, topk=None, full_attention_layers=(), decode="moba", backend="auto",
           cp_group=None, cp_layout="zigzag", cp_scheme="allgather", gate=None):
    """Turn MoBA on for a loaded transformers model (same parameters; nothing is added to the model).

    ``full_attention_layers`` keep dense attention (the paper's hybrid: e.g. the last 3 of 32 layers).
    ``decode="full"`` runs dense attention when generating from a cache (MoBA for prefill only).
    ``backend`` is passed to :func:`moba.moba_attention` ("auto": the GPU kernels on CUDA), and ``gate`` ("head", the
    default: MoBA; "group": the variant whose query heads of a kv head choose together, see its docstring).
    ``cp_group``: run every layer context-parallel over this process group (``cp_layout``, ``cp_scheme`` as in
    :func:`moba.distributed.moba_attention`); each rank then feeds its shard of the sequence with its positions.
    Settings already in ``model.config.moba`` (a saved model) are the defaults.
    """
    register()
    prev = dict(getattr(model.config, "moba", None) or {})
    block_size = block_size if block_size is not None else prev.get("block_size")
    topk = topk if topk is not None else prev.get("topk")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an int >= 1 (it counts the own block), got {topk!r}")
    gate = gate if gate is not None else prev.get("gate", "head")
    check_gate(gate)
    if decode not in ("moba", "full"):
        raise ValueError(f"decode must be 'moba' or 'full', got {decode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if cp_group is not None:
        from ..distributed import LAYOUTS, SCHEMES
        if cp_layout not in LAYOUTS or cp_scheme not in SCHEMES:
            raise ValueError(f"cp_layout must be one of {LAYOUTS} and cp_scheme one of {SCHEMES}, got "
                             f"{cp_layout!r} and {cp_scheme!r}")
        _CP[id(model.config)] = (cp_group, cp_layout, cp_scheme)
    else:
        _CP.pop(id(model.config), None)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    full = sorted({int(i) % n_layers if n_layers else int(i) for i in (full_attention_layers or
                                                                      prev.get("full_attention_layers", ()))})
    current = getattr(model.config, "_attn_implementation", None)
    model.config.moba = {
        "block_size": block_size, "topk": topk, "gate": gate, "full_attention_layers": full, "decode": decode,
        "backend": backend,
        "mode": prev.get("mode", "moba"), "layer_modes": prev.get("layer_modes", {}),
        "previous": prev.get("previous") or (current if current not in (None, NAME) else "sdpa"),
    }
    model.set_attn_implementation(NAME)
    return model


def set_mode(model, mode: str, layers=None):
    """Switch to "moba" or "full" attention for every layer (``layers=None``) or the listed ones, live.

    ``set_mode(model, "full")`` after MoBA pre-training gives the paper's two-stage schedule;
    ``set_mode(model, "moba")`` returns to MoBA (the listed full-attention layers stay full).
    """
    if mode not in ("moba", "full"):
        raise ValueError(f"mode must be 'moba' or 'full', got {mode!r}")
    cfg = getattr(model.config, "moba", None)
    if not cfg:
        raise ValueError("call moba.hf.enable(model, ...) before set_mode")
    cfg = dict(cfg)
    if layers is None:
        cfg["mode"], cfg["layer_modes"] = mode, {}
    else:
        n = getattr(model.config, "num_hidden_layers", None)
        modes = dict(cfg.get("layer_modes") or {})
        for i in layers:
            modes[str(int(i) % n if n else int(i))] = mode
        cfg["layer_modes"] = modes
    model.config.moba = cfg
    return model


def disable(model):
    """Restore the attention implementation the model had before ``enable``."""
    cfg = getattr(model.config, "moba", None) or {}
    _CP.pop(id(model.config), None)
    model.set_attn_implementation(cfg.get("previous") or "sdpa")
    if hasattr(model.config, "moba"):
        delattr(model.config, "moba")
    return model
