"""Input validation and packed-sequence bookkeeping shared by every MoBA backend.

Every backend works on *packed* tensors: a batch ``[B, T, H, D]`` is viewed as ``B`` sequences laid end
to end (``[B*T, H, D]``) with offsets ``cu_q``/``cu_k``.  ``Layout`` holds what the kernels need to find,
for any query row, its sequence, its position among that sequence's keys and its own key block.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .utils import cached, to_device

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "torch", "naive", "triton", "gluon")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_cu_meta(name: str, cu, device: torch.device) -> None:
    """What can be checked of an offsets tensor without reading its values (no device sync)."""
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"{name} must be a 1-D integer torch.Tensor, got {type(cu).__name__}")
    if cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D int32 (or int64) tensor, got shape {tuple(cu.shape)} "
                         f"and dtype {cu.dtype}")
    if cu.numel() < 2:
        raise ValueError(f"{name} must hold at least 2 offsets ([0, ..., T]), got {cu.numel()}")
    if cu.device != device and cu.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU or on q's device ({device}), got {cu.device}")


def _check_cu(name: str, cu, total: int, device: torch.device) -> list[int]:
    _check_cu_meta(name, cu, device)
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    if any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {vals}")
    if vals[-1] != total:
        raise ValueError(f"{name} must end at the number of packed tokens ({total}), got {vals[-1]}")
    return vals


SEL16_LIMIT = 2**15   # block ids below this are kept as int16 (tests lower it to reach the int32 path)


def sel_dtype(B: int, Tk: int, block_size: int, cu_k) -> torch.dtype:
    """dtype of the selection kept for the backward (global block ids, -1 for none): int16 while every
    block id fits, else int32. Decided from shapes alone (at most ``B * Tk // block_size`` whole blocks
    plus one partial block per sequence), so that torch.compile's fake shapes agree with the real op."""
    n_seq = B if cu_k is None else cu_k.numel() - 1
    return torch.int16 if B * Tk // block_size + n_seq < SEL16_LIMIT else torch.int32


@dataclass
class Layout:
    """Packed-sequence geometry (host lists plus device tensors)."""

    B: int                    # batch size of the 4-D inputs
    Tq: int                   # query rows per batch entry (packed total when varlen)
    Tk: int
    cu_q: list[int]           # [N+1] offsets of each sequence's queries in the packed rows
    cu_k: list[int]           # [N+1] offsets of each sequence's keys
    block_size: int
    blk_off: list[int]        # [N+1] offsets of each sequence's key blocks in the global block list

    @property
    def n_seqs(self) -> int:
        return len(self.cu_q) - 1

    @property
    def n_blocks(self) -> int:
        return self.blk_off[-1]

    @functools.cached_property
    def most_blocks(self) -> int:
        """Blocks of the longest sequence (1 if none)."""
        return max((b - a for a, b in zip(self.blk_off, self.blk_off[1:])), default=1)

    @property
    def total_q(self) -> int:
        return self.cu_q[-1]

    @property
    def total_k(self) -> int:
        return self.cu_k[-1]

    def key(self) -> tuple:
        return (tuple(self.cu_q), tuple(self.cu_k), self.block_size)

    def tensors(self, device) -> "LayoutTensors":
        """Per-row and per-block index tensors on ``device`` (int64), cached: every layer of a model
        shares one layout, so the host work and copies happen once per distinct layout."""
        return cached(("tensors", self.key(), str(device)), lambda: LayoutTensors.build(self, device))


@dataclass
class LayoutTensors:
    q_pos: torch.Tensor       # [total_q] global key row of the query's own position (keys <= it are visible)
    q_seq: torch.Tensor       # [total_q] sequence id
    own_block: torch.Tensor   # [total_q] global id of the query's own key block
    first_block: torch.Tensor  # [total_q] global id of the first block of the query's sequence
    blk_start: torch.Tensor   # [n_blocks] first key row of each block
    blk_end: torch.Tensor     # [n_blocks] one past the last key row of each block
    cu_q: torch.Tensor        # [N+1] query offsets
    cu_k: torch.Tensor        # [N+1] key offsets
    blk_off: torch.Tensor     # [N+1] offsets of each sequence's blocks in the global block list

    @staticmethod
    def build(lay: Layout, device) -> "LayoutTensors":
        bs = lay.block_size
        n = lay.n_seqs
        lq = torch.tensor([lay.cu_q[i + 1] - lay.cu_q[i] for i in range(n)], dtype=torch.int64)
        lk = torch.tensor([lay.cu_k[i + 1] - lay.cu_k[i] for i in range(n)], dtype=torch.int64)
        cu_q = torch.tensor(lay.cu_q, dtype=torch.int64)
        cu_k = torch.tensor(lay.cu_k, dtype=torch.int64)
        blk_off = torch.tensor(lay.blk_off, dtype=torch.int64)
        q_seq = torch.repeat_interleave(torch.arange(n), lq)
        local = torch.arange(lay.total_q) - cu_q[q_seq] + (lk - lq)[q_seq]   # position among own keys
        q_pos = cu_k[q_seq] + local
        own_block = blk_off[q_seq] + torch.div(local, bs, rounding_mode="floor")
        nb = blk_off[1:] - blk_off[:-1]
        b_seq = torch.repeat_interleave(torch.arange(n), nb)
        b_local = torch.arange(lay.n_blocks) - blk_off[b_seq]
        blk_start = cu_k[b_seq] + b_local * bs
        blk_end = torch.minimum(blk_start + bs, cu_k[b_seq + 1])
        return LayoutTensors(*(to_device(t, device) for t in (q_pos, q_seq, own_block, blk_off[q_seq],
                                                               blk_start, blk_end, cu_q, cu_k, blk_off)))


GATES = ("head", "group")


def check_gate(gate) -> bool:
    """``gate``'s check; True for the shared (``"group"``) gate."""
    if gate not in GATES:
        raise ValueError(f"gate must be 'head' (MoBA: every query head chooses its own blocks) or 'group' (a variant: "
                         f"the query heads of a kv head choose together), got {gate!r}")
    return gate == "group"


def check_args(q, k, v, block_size, topk, cu_seqlens=None, cu_seqlens_k=None, scale=None,
               backend="auto") -> float:
    """Every check of ``moba_attention``'s arguments that needs no tensor values (so no device sync,
    and nothing that stops torch.compile); returns the softmax scale. Raises ValueError naming the
    argument and what was expected."""
    if not _is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if not _is_int(topk) or topk < 1:
        raise ValueError(f"topk must be an int >= 1 (it counts the own block), got {topk!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Tq, Hq, D = q.shape
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in [B, T, H], got k {tuple(k.shape)} and v {tuple(v.shape)}")
    Bk, Tk, Hkv, Dk = k.shape
    if Bk != B:
        raise ValueError(f"q and k must have the same batch size, got {B} and {Bk}")
    if Dk != D:
        raise ValueError(f"q and k must have the same head dim, got {D} and {Dk}")
    if D < 1 or v.shape[3] < 1:
        raise ValueError(f"head dims must be >= 1, got q/k {D} and v {v.shape[3]}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the number of "
                         f"key/value heads ({Hkv})")
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                  and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if cu_seqlens_k is not None and cu_seqlens is None:
        raise ValueError("cu_seqlens_k needs cu_seqlens (the queries' offsets) as well")
    if cu_seqlens is None:
        if Tq > Tk:
            raise ValueError(f"queries must not outnumber keys (Tq={Tq} > Tk={Tk}); queries are aligned "
                             f"to the end of the keys")
    else:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got {B}")
        _check_cu_meta("cu_seqlens", cu_seqlens, q.device)
        if cu_seqlens_k is None:
            if Tq != Tk:
                raise ValueError(f"cu_seqlens_k is required when queries and keys differ in length "
                                 f"(Tq={Tq}, Tk={Tk})")
        else:
            _check_cu_meta("cu_seqlens_k", cu_seqlens_k, q.device)
            if cu_seqlens_k.numel() != cu_seqlens.numel():
                raise ValueError(f"cu_seqlens_k must describe as many sequences as cu_seqlens "
                                 f"({cu_seqlens.numel() - 1}), got {cu_seqlens_k.numel() - 1}")
    return float(scale) if scale is not None else D ** -0.5


def make_layout(q, k, block_size, cu_seqlens=None, cu_seqlens_k=None) -> Layout:
    """The packed layout; reads the offsets' values (checked here: start at 0, non-decreasing, end at
    T, no sequence with more queries than keys). Call after ``check_args``."""
    B, Tq = q.shape[:2]
    Tk = k.shape[1]
    if cu_seqlens is None:
        cu_q = [i * Tq for i in range(B + 1)]
        cu_k = [i * Tk for i in range(B + 1)]
    else:
        cu_q = _check_cu("cu_seqlens", cu_seqlens, Tq, q.device)
        cu_k = cu_q if cu_seqlens_k is None else _check_cu("cu_seqlens_k", cu_seqlens_k, Tk, q.device)
        for i in range(len(cu_q) - 1):
            lq, lk = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
            if lq > lk:
                raise ValueError(f"sequence {i} has more queries ({lq}) than keys ({lk}) in "
                                 f"cu_seqlens/cu_seqlens_k")
    nblk = [-(-(cu_k[i + 1] - cu_k[i]) // block_size) for i in range(len(cu_k) - 1)]
    blk_off = [0]
    for n in nblk:
        blk_off.append(blk_off[-1] + n)
    return Layout(B=B, Tq=Tq, Tk=Tk, cu_q=cu_q, cu_k=cu_k, block_size=block_size, blk_off=blk_off)


def validate(q, k, v, block_size, topk, cu_seqlens=None, cu_seqlens_k=None, scale=None,
             backend="auto") -> tuple[Layout, float]:
    """``check_args`` and ``make_layout`` together: the layout and the softmax scale."""
    sc = check_args(q, k, v, block_size, topk, cu_seqlens, cu_seqlens_k, scale, backend)
    return make_layout(q, k, block_size, cu_seqlens, cu_seqlens_k), sc


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] -> [B*T, H, D] (a view when possible)."""
    return x.reshape(x.shape[0] * x.shape[1], x.shape[2], x.shape[3])
