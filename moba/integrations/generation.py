"""Generation through MoBA's KV cache for transformers models: ``MobaCache`` and ``generate``.

``MobaCache`` is a transformers ``Cache`` whose layers hold static buffers, [B, max_length, Hkv, D] keys and values,
the fp32 key sums of every block (the gate's state, see :mod:`moba.kvcache`) and each row's length as an int32
device tensor. A layer's attention appends its new keys and reads the cache through
:func:`moba.moba_attention_with_kvcache`, which needs no host synchronisation and keeps its launch shapes, so a
decode step of the whole model can be captured as a CUDA graph and replayed while the lengths grow.

How a forward reaches the cache: the model calls ``cache.update(key, value, layer)`` and passes the returned tensors
to the attention function; ``update`` keeps nothing in transformers' sense (it returns the new keys themselves and
remembers them), and the attention function, seeing that its ``key`` is the tensor just handed out, appends it and
attends through the cache. The cache reports the mask of the new tokens alone, which transformers skips (the kernel
knows each row's length; transformers' mask is neither built nor read).

Rows may hold different lengths (ragged prompts, no padding). A forward through the cache must pass
``position_ids`` when the rows' lengths differ (``generate`` does).
"""
from __future__ import annotations

import inspect
import threading
import weakref

import torch

from ..api import moba_attention, resolve_backend
from ..kvcache import cache_key_sums, moba_attention_with_kvcache

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("moba.hf needs transformers: pip install 'moba[hf]'") from e

_HANDED = threading.local()     # .last = (cache, layer_idx, weak reference to the key tensor) of the latest update
APPEND_CHUNK = 4096             # new tokens per serving step when a forward continues a non-empty cache


class _MobaLayer(CacheLayerMixin):
    """One layer's buffers, allocated at the first update (dtype and device of its keys)."""
    is_sliding = False

    def __init__(self, batch_size: int, max_length: int, block_size: int):
        super().__init__()
        self.B, self.T, self.bs = batch_size, max_length, block_size
        self.keys = self.values = self.sums = self.lens = None
        self.is_initialized = False         # (transformers 4.x's base sets no such flag)
        self.filled = [False] * batch_size  # rows a prefill wrote (host side)

    def lazy_initialization(self, key_states, value_states):
        B, Hkv, _, D = key_states.shape
        dev = key_states.device
        self.keys = torch.zeros(self.B, self.T, Hkv, D, dtype=key_states.dtype, device=dev)
        self.values = torch.zeros(self.B, self.T, Hkv, value_states.shape[3], dtype=value_states.dtype, device=dev)
        self.sums = torch.zeros(self.B, -(-self.T // self.bs), Hkv, D, dtype=torch.float32, device=dev)
        self.lens = torch.zeros(self.B, dtype=torch.int32, device=dev)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):     # the cache's update does the work
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.T

    def get_max_cache_shape(self) -> int:       # transformers 4.x's name of get_max_length
        return self.T

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
            self.sums.zero_()
            self.lens.zero_()
        self.filled = [False] * self.B


class MobaCache(Cache):
    """A static KV cache read by MoBA's serving step: ``batch_size`` rows of up to ``max_length`` tokens.

    Made for a model that ``moba.hf.enable`` switched on (its block size sizes the key sums). Its buffers are
    allocated by the first forward through it. ``seen`` holds each row's length as the host knows it.
    """

    def __init__(self, model, batch_size: int, max_length: int):
        cfg = getattr(model.config, "moba", None)
        if not cfg:
            raise ValueError("MobaCache needs a model with MoBA on: call moba.hf.enable(model, ...) first")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        n = model.config.num_hidden_layers
        super().__init__(layers=[_MobaLayer(batch_size, max_length, int(cfg["block_size"])) for _ in range(n)])
        self._config = model.config
        self.rows_total, self.max_length = batch_size, max_length
        self.seen = [0] * batch_size
        self.rows = slice(0, batch_size)     # the rows a forward feeds (generate prefills ragged rows one by one)
        self._fresh = False

    @property
    def row_ids(self) -> range:
        """The rows the current forward feeds (``rows`` as indices)."""
        return range(self.rows_total)[self.rows]

    # transformers' view: the mask of the new tokens alone (skipped); lengths come from the host's count
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.seen[self.rows])

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        # transformers 4.x passes the new tokens' cache_position tensor, 5.x their count
        return (query_length.shape[0] if isinstance(query_length, torch.Tensor) else query_length), 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Hands the new keys and values back untouched and remembers them for this layer's attention."""
        if getattr(self._config, "_attn_implementation", None) != "moba":
            # another attention would read the new keys alone as if they were the whole sequence
            raise ValueError("MobaCache is read by MoBA's attention only: the model's attn_implementation is "
                             f"{getattr(self._config, '_attn_implementation', None)!r} (moba.hf.enable switches it)")
        rows = self.row_ids
        Tq = key_states.shape[2]
        if key_states.shape[0] != len(rows):
            raise ValueError(f"a forward through MobaCache feeds its {len(rows)} rows (cache.rows), got a batch of "
                             f"{key_states.shape[0]}")
        if layer_idx == 0:
            over = [b for b in rows if self.seen[b] + Tq > self.max_length]
            if over:
                raise ValueError(f"MobaCache holds max_length={self.max_length} tokens per row; row {over[0]} has "
                                 f"{self.seen[over[0]]} and {Tq} more were fed")
            self._fresh = all(self.seen[b] == 0 for b in rows)
            self._advance(Tq)       # counted here, so that a model running fewer layers than it lists keeps count
        out = self.layers[layer_idx].update(key_states, value_states)
        _HANDED.last = (self, layer_idx, weakref.ref(key_states))
        return out

    def _advance(self, Tq: int) -> None:
        for b in self.row_ids:
            self.seen[b] += Tq

    def reset(self):
        super().reset()
        self.seen = [0] * self.rows_total


def handed_cache(layer, key):
    """The MobaCache whose update just handed out ``key`` for this layer, else None; a ValueError where a MobaCache's
    keys reached another layer's attention or reached it changed (the cache could not be read correctly)."""
    last = getattr(_HANDED, "last", None)
    if last is None:
        return None
    _HANDED.last = None
    handed = last[2]()
    if handed is None:          # left by a forward that stopped between the update and the attention
        return None
    if last[1] != layer or handed is not key:
        raise ValueError("this model changes the keys between MobaCache.update and its attention call, or calls them "
                         f"for different layers ({last[1]} and {layer}); MobaCache needs each layer's keys exactly as "
                         "the cache handed them back")
    return last[0]


def cache_attention(module, cache: MobaCache, cfg: dict, full: bool, query, key, value, scaling):
    """One layer's attention through the cache: [B, Hq, Tq, D] new queries and their keys -> [B, Tq, Hq, D].

    Rows that are all empty (a prefill) run ``moba_attention`` over the new tokens (or transformers' SDPA for a
    dense layer) and write them into the cache; otherwise the step appends and attends through
    ``moba_attention_with_kvcache``, a dense layer (or, with ``decode="full"``, every layer) with every block
    selected, which is exact causal attention."""
    from .transformers import _dense
    layer = module.layer_idx
    st = cache.layers[layer]
    bs, topk, be, gate = int(cfg["block_size"]), int(cfg["topk"]), cfg.get("backend", "auto"), cfg.get("gate", "head")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))            # [B, T, H, D] views
    rows, Tq = cache.rows, q.shape[1]
    if cache._fresh:
        if any(st.filled[b] for b in cache.row_ids):
            raise ValueError(f"layer {layer} of MobaCache already holds these rows' tokens but the cache counts none "
                             "(a forward through it stopped midway?): reset the cache")
        if full:
            out = _dense(module, query, key, value, None, 0.0, scaling)[0]
        else:
            out = moba_attention(q, k, v, bs, topk, scale=scaling, backend=be, gate=gate)
        st.keys[rows, :Tq] = k
        st.values[rows, :Tq] = v
        nb = -(-Tq // bs)
        st.sums[rows].zero_()
        st.sums[rows, :nb] = cache_key_sums(k, bs, cache_seqlens=torch.full((k.shape[0],), Tq, device=k.device))
        st.lens[rows] = Tq
        for b in cache.row_ids:
            st.filled[b] = True
    else:
        dense = full or cfg.get("decode", "moba") == "full"
        outs = []
        for t0 in range(0, Tq, APPEND_CHUNK):    # a long continuation in chunks: every query is a row of the step
            t1 = min(Tq, t0 + APPEND_CHUNK)
            outs.append(moba_attention_with_kvcache(
                q[:, t0:t1], st.keys[rows], st.values[rows], bs, st.sums.shape[1] if dense else topk,
                cache_seqlens=st.lens[rows], k_new=k[:, t0:t1], v_new=v[:, t0:t1], key_sums=st.sums[rows],
                scale=scaling, backend=be, gate=gate))
            st.lens[rows] += t1 - t0
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    return out


def _as_rows(prompts, device):
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype not in (torch.int64, torch.int32) or prompts.shape[1] < 1:
            raise ValueError(f"prompts must be a LongTensor [B, T] with T >= 1 or a list of 1-D LongTensors, got "
                             f"{tuple(prompts.shape)} {prompts.dtype}")
        return [p.to(device) for p in prompts.long()]
    rows = list(prompts)
    if not rows or any(not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() < 1 or
                       p.dtype not in (torch.int64, torch.int32) for p in rows):
        raise ValueError("prompts must be a LongTensor [B, T] or a non-empty list of non-empty 1-D LongTensors")
    return [p.to(device).long() for p in rows]


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int, *, cache: MobaCache | None = None, max_length: int | None = None,
             cuda_graph="auto", eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy generation through MoBA's KV cache; returns the new tokens, LongTensor [B, max_new_tokens].

    Args:
        model: a transformers causal LM with MoBA on (``moba.hf.enable``).
        prompts: LongTensor [B, T], or a list of B 1-D LongTensors of different lengths (no padding: each row's
            blocks count from its own first token).
        cache: a :class:`MobaCache` to continue (its rows' tokens are the context before ``prompts``); None: a new
            one of ``max_length`` tokens per row (default: the longest prompt plus ``max_new_tokens``).
        cuda_graph: capture one decode step of the whole model and replay it ("auto": on CUDA with the kernel
            backend). The first two steps run eagerly (they compile the kernels), the third is captured.
        eos_token_id: a row that produced it keeps producing it (the launch shapes stay fixed).

    Every row's prompt is one prefill forward (rows of equal length and context together); each new token is one
    forward of the batch.
    """
    if not getattr(model.config, "moba", None):
        raise ValueError("moba.hf.generate needs a model with MoBA on: call moba.hf.enable(model, ...) first")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    device = next(model.parameters()).device
    rows = _as_rows(prompts, device)
    B = len(rows)
    if cache is None:
        need = max(len(p) for p in rows) + max_new_tokens
        cache = MobaCache(model, B, max_length if max_length is not None else need)
    elif not isinstance(cache, MobaCache) or cache.rows_total != B:
        raise ValueError(f"cache must be a MobaCache of batch_size {B} (one row per prompt), got {cache!r}")
    elif max_length is not None and max_length != cache.max_length:
        raise ValueError(f"max_length={max_length} disagrees with the given cache's {cache.max_length}")
    long = [b for b, p in enumerate(rows) if cache.seen[b] + len(p) + max_new_tokens > cache.max_length]
    if long:
        b = long[0]
        raise ValueError(f"row {b} needs {cache.seen[b] + len(rows[b]) + max_new_tokens} tokens (context "
                         f"{cache.seen[b]}, prompt {len(rows[b])}, max_new_tokens {max_new_tokens}) but the cache "
                         f"holds max_length={cache.max_length}")
    kernels = resolve_backend(model.config.moba.get("backend", "auto"),
                              torch.empty(0, device=device)) in ("triton", "gluon")
    if cuda_graph == "auto":
        cuda_graph = device.type == "cuda" and kernels
    elif cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device, got {device}")
    elif cuda_graph and not kernels:     # the torch backend reads the lengths on the host: not capturable
        raise ValueError("cuda_graph=True needs the kernel backend (moba.hf.enable(..., backend='auto' or 'triton')); "
                         f"this model's is {model.config.moba.get('backend')!r}")
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def forward(ids, pos):
        return model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, **keep).logits[:, -1]

    # prefill: rows of equal prompt and context length go together, the others one by one
    first = torch.empty(B, dtype=torch.long, device=device)
    same = len({(len(p), cache.seen[b]) for b, p in enumerate(rows)}) == 1
    groups = [list(range(B))] if same else [[b] for b in range(B)]
    try:
        for g in groups:
            cache.rows = slice(g[0], g[-1] + 1)
            start = cache.seen[g[0]]
            ids = torch.stack([rows[b] for b in g])
            pos = torch.arange(start, start + ids.shape[1], device=device)[None].expand(len(g), -1)
            first[g[0]:g[-1] + 1] = forward(ids, pos).argmax(-1)
    finally:
        cache.rows = slice(0, B)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    out[:, 0] = first
    tok = first[:, None].clone()                       # the step's static input
    done = torch.zeros(B, dtype=torch.bool, device=device)
    if eos_token_id is not None:
        done |= first == eos_token_id
    lens0 = cache.layers[0]

    def step():
        nxt = forward(tok, lens0.lens.long()[:, None]).argmax(-1)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done.logical_or_(nxt == eos_token_id)
        tok.copy_(nxt[:, None])

    n_steps = max_new_tokens - 1
    if not cuda_graph or n_steps < 3:
        for i in range(n_steps):
            step()
            out[:, i + 1] = tok[:, 0]
        return out
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):                      # eager steps (compile the kernels) off the capture stream
        for i in range(2):
            step()
            out[:, i + 1] = tok[:, 0]
    torch.cuda.current_stream(device).wait_stream(side)
    seen_after = list(cache.seen)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()                                         # recorded, not run: every replay is one step
    cache.seen = seen_after
    for i in range(2, n_steps):
        graph.replay()
        out[:, i + 1] = tok[:, 0]
        cache._advance(1)
    return out
