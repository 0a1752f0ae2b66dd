"""Small host helpers shared across the package: ceiling division, powers of two, NaN-poisoned allocations
for tests, a small cache of layout-derived tables, non-blocking host-to-device copies."""
from __future__ import annotations

import functools
import os

import torch


def poisoned() -> bool:
    """Tests set MOBA_POISON=1 so that fast paths allocate outputs NaN-filled (and index tables filled with a valid
    but wrong value where NaN cannot be stored): an element a kernel forgot to write fails the test."""
    return os.environ.get("MOBA_POISON") == "1"


def new_empty(*shape, dtype, device) -> torch.Tensor:
    """torch.empty, or NaN-filled under MOBA_POISON=1."""
    if poisoned():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)


_CACHE: dict = {}
_CACHE_SIZE = 16


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host integers: `triton.cdiv` and `triton.next_power_of_2` are constexpr functions in
    Triton 3.6, a few microseconds per host call, which an 8K forward's launches add up."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """`triton.next_power_of_2` for host integers >= 0 (0 for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.lru_cache(maxsize=None)
def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (the persistent kernels' grids, the decode split count)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def cached(key, make):
    """A small LRU cache for layout-derived tables (index tensors, tile lists)."""
    if key in _CACHE:
        _CACHE[key] = _CACHE.pop(key)
        return _CACHE[key]
    val = make()
    _CACHE[key] = val
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    return val


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host tensor -> device without stalling the stream (pinned, non-blocking copy on CUDA)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
