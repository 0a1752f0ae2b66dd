"""Collectives for context parallelism, with autograd where a tensor's gradient crosses ranks, and the sequence
layouts they move tokens between.

A sequence of T tokens (dim 1 of [B, T, H, D]) is held by P ranks:

* "contiguous": rank r holds tokens [r * T/P, (r + 1) * T/P).
* "zigzag": the sequence is cut into 2P chunks of C = T / 2P tokens; rank r holds chunk r and chunk 2P - 1 - r,
  in that order. Under causal dense attention this balances the work (an early chunk with a late one).

Collectives gather into, and scatter from, the rank-major order (rank 0's tokens, then rank 1's, ...);
``to_sequence`` / ``to_ranks`` permute between that and the sequence order (one copy each, nothing for P = 1 or
the contiguous layout).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag")
# the single-tensor collectives under their current names (PyTorch 2.13 deprecates the *_tensor names that older
# releases, the GPU machines' 2.11 among them, have alone)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def world(group) -> tuple[int, int]:
    """(this rank's index in ``group``, the group's size)."""
    return dist.get_rank(group), dist.get_world_size(group)


def chunks(n_local: int, rank: int, P: int, layout: str) -> list[tuple[int, int, int]]:
    """The runs of consecutive tokens a rank holds: (start in the local shard, start in the sequence, length)."""
    if layout == "contiguous":
        return [(0, rank * n_local, n_local)]
    C = n_local // 2
    return [(0, rank * C, C), (C, (2 * P - 1 - rank) * C, C)]


def _chunk_order(P: int) -> list[int]:
    """For each zigzag chunk in sequence order, its index in the rank-major order (rank p's halves at 2p, 2p + 1)."""
    return [2 * c if c < P else 2 * (2 * P - 1 - c) + 1 for c in range(2 * P)]


def to_sequence(x: torch.Tensor, P: int, layout: str, dim: int = 1) -> torch.Tensor:
    """Rank-major tokens along ``dim`` -> sequence order."""
    if layout == "contiguous" or P == 1:
        return x
    T = x.shape[dim]
    xs = x.unflatten(dim, (2 * P, T // (2 * P)))
    idx = torch.tensor(_chunk_order(P), device=x.device)
    return xs.index_select(dim, idx).flatten(dim, dim + 1)


def to_ranks(x: torch.Tensor, P: int, layout: str, dim: int = 1) -> torch.Tensor:
    """Sequence order along ``dim`` -> rank-major tokens (the inverse of ``to_sequence``)."""
    if layout == "contiguous" or P == 1:
        return x
    T = x.shape[dim]
    order = _chunk_order(P)
    inv = [0] * (2 * P)
    for c, i in enumerate(order):
        inv[i] = c
    xs = x.unflatten(dim, (2 * P, T // (2 * P)))
    return xs.index_select(dim, torch.tensor(inv, device=x.device)).flatten(dim, dim + 1)


def all_gather_tokens(x: torch.Tensor, group) -> torch.Tensor:
    """[B, n, ...] on every rank -> [B, P * n, ...] in rank-major order (no autograd)."""
    P = dist.get_world_size(group)
    if P == 1:
        return x
    xt = x.transpose(0, 1).contiguous()                                       # tokens first: each rank's part is one run
    out = xt.new_empty((P * xt.shape[0],) + tuple(xt.shape[1:]))
    _all_gather_single(out, xt, group=group)
    return out.transpose(0, 1)


def reduce_scatter_tokens(x: torch.Tensor, group) -> torch.Tensor:
    """[B, P * n, ...] rank-major on every rank -> this rank's [B, n, ...], summed over the ranks (no autograd)."""
    P = dist.get_world_size(group)
    if P == 1:
        return x
    xt = x.transpose(0, 1).contiguous()
    out = xt.new_empty((xt.shape[0] // P,) + tuple(xt.shape[1:]))
    _reduce_scatter_single(out, xt, group=group)
    return out.transpose(0, 1)


def gather_sequence(x: torch.Tensor, group, layout: str) -> torch.Tensor:
    """The whole sequence, in order, from every rank's shard (no autograd)."""
    return to_sequence(all_gather_tokens(x, group), dist.get_world_size(group), layout)


def scatter_sequence_sum(x: torch.Tensor, group, layout: str) -> torch.Tensor:
    """A whole-sequence tensor on every rank -> this rank's shard of their sum (no autograd)."""
    return reduce_scatter_tokens(to_ranks(x, dist.get_world_size(group), layout), group)


class GatherSequence(torch.autograd.Function):
    """All-gather of a sequence shard in sequence order; backward: the gradient's shard, summed over the ranks (each
    rank's loss may read every token)."""

    @staticmethod
    def forward(ctx, x, group, layout):
        ctx.group, ctx.layout = group, layout
        return gather_sequence(x, group, layout)

    @staticmethod
    def backward(ctx, g):
        return scatter_sequence_sum(g.contiguous(), ctx.group, ctx.layout), None, None


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Part p of ``x`` (dim 0, P equal parts) to rank p; returns the parts received, by source rank, along dim 0."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def seq_to_heads(x: torch.Tensor, group, layout: str) -> torch.Tensor:
    """Sequence shard [B, n, H, D] -> this rank's H/P heads of the whole sequence [B, P * n, H/P, D], in sequence
    order (rank r takes heads r * H/P .. (r + 1) * H/P - 1; no autograd)."""
    P = dist.get_world_size(group)
    if P == 1:
        return x
    B, n, H, D = x.shape
    parts = x.reshape(B, n, P, H // P, D).permute(2, 0, 1, 3, 4)               # [P (head group), B, n, H/P, D]
    got = _all_to_all(parts, group)                                             # [P (source rank), B, n, H/P, D]
    return to_sequence(got.permute(1, 0, 2, 3, 4).reshape(B, P * n, H // P, D), P, layout)


def heads_to_seq(x: torch.Tensor, group, layout: str) -> torch.Tensor:
    """The inverse of ``seq_to_heads``: [B, T, H/P, D] of the whole sequence -> this rank's shard [B, T/P, H, D]."""
    P = dist.get_world_size(group)
    if P == 1:
        return x
    B, T, h, D = x.shape
    n = T // P
    parts = to_ranks(x, P, layout).reshape(B, P, n, h, D).permute(1, 0, 2, 3, 4)   # [P (destination), B, n, h, D]
    got = _all_to_all(parts, group)                                                # [P (head group), B, n, h, D]
    return got.permute(1, 2, 0, 3, 4).reshape(B, n, P * h, D)


class _Reshard(torch.autograd.Function):
    """``there`` in the forward, its inverse ``back`` on the gradient."""

    @staticmethod
    def forward(ctx, x, group, layout, there, back):
        ctx.group, ctx.layout, ctx.back = group, layout, back
        return there(x, group, layout)

    @staticmethod
    def backward(ctx, g):
        return ctx.back(g.contiguous(), ctx.group, ctx.layout), None, None, None, None


def seq_to_heads_grad(x: torch.Tensor, group, layout: str) -> torch.Tensor:
    """``seq_to_heads`` with autograd."""
    return _Reshard.apply(x, group, layout, seq_to_heads, heads_to_seq)


def heads_to_seq_grad(x: torch.Tensor, group, layout: str) -> torch.Tensor:
    """``heads_to_seq`` with autograd."""
    return _Reshard.apply(x, group, layout, heads_to_seq, seq_to_heads)
