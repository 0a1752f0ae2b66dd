"""The gate's state for decoding: block means of a growing KV cache, kept up to date incrementally."""
from __future__ import annotations

import torch

from .torch_backend.gate import POOL_TILE, _acc_dtype
from .utils import to_device


class BlockMeansCache:
    """Mean keys of the complete blocks of a growing KV cache (one sequence or a packed batch), updated
    incrementally.

    The gate only ever scores *complete* blocks (a query's earlier blocks), so when a cache grows by a
    few tokens at most one new block per sequence completes: ``means`` pools just the blocks completed
    since the last call instead of re-reading the whole cache. Contract: the same sequences, each grown
    by appending (a sequence that got shorter, a different number of sequences or different shapes reset
    the cache); call ``reset`` when new sequences start.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self._store = None    # [sum of capacities, Hkv, D] fp32 (fp64 for fp64 keys); rows past the
        self._base = []       # complete blocks of a sequence stay zero. Sequence i owns rows
        self._cap = []        # _base[i] .. _base[i] + _cap[i].
        self._lens = []       # keys of each sequence at the last call
        self._key = None
        self._packed = None   # the last result of several sequences: reused while no block completes

    @property
    def n_keys(self) -> int:
        return sum(self._lens)

    @property
    def seq_lens(self) -> list:
        """Keys of each sequence at the last call ([] after a reset)."""
        return list(self._lens)

    def means(self, k: torch.Tensor, block_size: int, cu_seqlens_k=None, *, starts=None, ends=None) -> torch.Tensor:
        """k [Tk, Hkv, D] packed; ``cu_seqlens_k`` (host ints or a tensor, None for one sequence) ->
        [n_blocks, Hkv, D] in the packed layout's block order (``ceil(len / block)`` rows per sequence);
        the row of a sequence's last, partial block is zero (the gate never reads it).

        Padded batches: k [B, L, Hkv, D] with ``starts``/``ends`` (host ints per row): row b's keys are
        ``k[b, starts[b]:ends[b]]``; the result lists the rows' blocks one row after another."""
        if starts is not None:
            kk, offs, rows = k, [int(x) for x in starts], list(range(k.shape[0]))
            lens = [int(e) - o for o, e in zip(offs, ends)]
        else:
            kk = k[None]
            cu = ([0, k.shape[0]] if cu_seqlens_k is None else cu_seqlens_k.tolist() if torch.is_tensor(cu_seqlens_k)
                  else [int(x) for x in cu_seqlens_k])
            offs, rows, lens = cu[:-1], [0] * (len(cu) - 1), [b - a for a, b in zip(cu, cu[1:])]
        Hkv, D = kk.shape[2:]
        key = (block_size, Hkv, D, k.dtype, k.device, len(lens))     # packed or padded: same per-sequence means
        if self._key != key or any(n < m for n, m in zip(lens, self._lens)):
            self.reset()
            self._key, self._lens = key, [0] * len(lens)
        acc = _acc_dtype(k.dtype)
        nbs = [-(-n // block_size) for n in lens]
        if self._store is None or any(nb > c for nb, c in zip(nbs, self._cap)):     # grow: double capacities
            caps = [max(nb, 2 * (self._cap[i] if self._cap else 0), 16) for i, nb in enumerate(nbs)]
            base = [0]
            for c in caps[:-1]:
                base.append(base[-1] + c)
            grown = torch.zeros(sum(caps), Hkv, D, dtype=acc, device=k.device)
            if self._store is not None:
                for i, m in enumerate(self._lens):
                    done = m // block_size
                    grown[base[i]:base[i] + done] = self._store[self._base[i]:self._base[i] + done]
            self._store, self._base, self._cap = grown, base, caps
        src_row, src_t, dest = [], [], []        # blocks completed since the last call
        for i, (n, m) in enumerate(zip(lens, self._lens)):
            for j in range(m // block_size, n // block_size):
                src_row.append(rows[i])
                src_t.append(offs[i] + j * block_size)
                dest.append(self._base[i] + j)
        step = max(1, POOL_TILE // (block_size * Hkv * D))   # bounded temporaries, as in block_means
        for c0 in range(0, len(dest), step):
            r, t, d = src_row[c0:c0 + step], src_t[c0:c0 + step], dest[c0:c0 + step]
            if len(lens) == 1:                   # one sequence: its new blocks are one contiguous run
                new = kk[r[0], t[0]:t[0] + len(d) * block_size]
            else:
                ar = torch.arange(block_size, device=k.device)
                t_idx = (to_device(torch.tensor(t, dtype=torch.long), k.device)[:, None] + ar).flatten()
                new = kk[to_device(torch.tensor(r, dtype=torch.long), k.device).repeat_interleave(block_size), t_idx]
            pooled = new.reshape(len(d), block_size, Hkv, D).sum(1, dtype=acc) / block_size
            if len(lens) == 1:
                self._store[d[0]:d[0] + len(d)] = pooled
            else:
                self._store[to_device(torch.tensor(d, dtype=torch.long), k.device)] = pooled
        prev_nbs = [-(-m // block_size) for m in self._lens]
        self._lens = lens
        if len(lens) == 1:
            return self._store[:nbs[0]]
        if dest or self._packed is None or prev_nbs != nbs:   # else nothing changed since the last gather
            idx = [self._base[i] + j for i, nb in enumerate(nbs) for j in range(nb)]
            self._packed = self._store[to_device(torch.tensor(idx, dtype=torch.long), k.device)]
        return self._packed
