"""Context parallelism: MoBA (and dense causal attention, for hybrid models' full layers) over a sequence sharded
across the ranks of a torch.distributed process group (NCCL on GPUs, gloo on CPUs), exact: each rank gets its
shard of what one device would compute on the whole sequence.

    q, k, v = (moba.distributed.shard(x, layout="zigzag") for x in (q_full, k_full, v_full))
    out = moba.distributed.moba_attention(q, k, v, block_size=4096, topk=12)     # this rank's shard
    out_full = moba.distributed.unshard(out)                                     # all ranks: the whole output

docs/design.md explains the schemes and what they cost; docs/performance.md has the measurements.
"""
from __future__ import annotations

import torch

from . import comm
from .attention import SCHEMES, dense_attention, moba_attention
from .comm import LAYOUTS

__all__ = ["shard", "unshard", "positions", "moba_attention", "dense_attention", "LAYOUTS", "SCHEMES"]


def _check_layout(T: int, P: int, layout: str, what: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    parts = 2 * P if layout == "zigzag" else P
    if T % parts:
        raise ValueError(f"{what} ({T}) must be a multiple of {parts} for layout={layout!r} over {P} ranks "
                         f"({'2 chunks' if layout == 'zigzag' else '1 chunk'} per rank); pad the sequence, e.g. "
                         f"with a trailing document of padding tokens in cu_seqlens")


def shard(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """This rank's part of a whole-sequence tensor ``x`` (the sequence along ``dim``; every rank passes the same
    ``x``): chunk r of P ("contiguous") or chunks r and 2P-1-r of 2P ("zigzag"). A copy (contiguous)."""
    rank, P = comm.world(group)
    _check_layout(x.shape[dim], P, layout, f"the sequence length (dim {dim})")
    n = x.shape[dim] // P
    parts = [x.narrow(dim, g, L) for _, g, L in comm.chunks(n, rank, P, layout)]
    return torch.cat(parts, dim).contiguous() if len(parts) > 1 else parts[0].contiguous()


def unshard(x_local: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's shard (an all-gather, in sequence order), with autograd: the gradient
    of a rank's shard is the sum of every rank's gradient for those tokens."""
    _, P = comm.world(group)
    _check_layout(x_local.shape[dim] * P, P, layout, "the whole sequence length")
    x = x_local.movedim(dim, 1)
    return comm.GatherSequence.apply(x, group, layout).movedim(1, dim)


def positions(n_local: int, group=None, layout: str = "zigzag", device=None) -> torch.Tensor:
    """Positions in the whole sequence of this rank's ``n_local`` tokens (for rotary embeddings, losses): int64."""
    rank, P = comm.world(group)
    return torch.cat([torch.arange(g, g + L, device=device) for _, g, L in comm.chunks(n_local, rank, P, layout)])
