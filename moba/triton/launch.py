"""Kernel launches with Triton's per-call host work cached: ``launch_kernel(kernel, grid, *args, **kw)`` does what
``kernel[grid](*args, **kw)`` does.

Why: a short call (an 8K forward, a decode step) is bound by the host's time to issue its launches, and about half of
that was Triton's ``JITFunction.run`` under cProfile (binding the arguments, its cache key, the globals check, the
launch metadata; docs/performance.md, "The host at 8K"). Here the first launch of each specialisation goes through
Triton (it compiles and launches, so every check happens once), and later launches whose arguments specialise the
same way call the compiled kernel's launcher directly.

The key is at least as fine as Triton's own specialisation: per tensor its dtype and whether its address is 16-byte
aligned; per int whether it is 1, a multiple of 16, within int32 and within int64; bools, floats and None by type;
keyword arguments (constexprs, num_warps, num_stages) by value; tensor descriptors by dtype, block shape and layout;
and the current device. An argument of any other type, or one that does not hash, launches through Triton (no
cache). Not checked again on a cached launch: Triton's debug and instrumentation settings and the kernel's global
values (fixed in this package). Under ``TRITON_INTERPRET=1`` (no compiled kernel) every launch goes through Triton.
Opt-in (``MOBA_DIRECT_LAUNCH=1``) until it has been timed and tested on a GPU.
"""
from __future__ import annotations

import os

import torch

try:
    from triton import knobs        # Triton 3.4 on: the launch hooks' home
except ImportError:                 # older Triton: no cache
    knobs = None

_ON = os.environ.get("MOBA_DIRECT_LAUNCH", "0") == "1" and knobs is not None
_I32, _I64 = 1 << 31, 1 << 63        # Triton passes an int as i32, i64 or u64 by its value


def _spec(a):
    """The part of one positional argument that Triton specialises a kernel on (hashable), or raise TypeError."""
    t = type(a)
    if t is torch.Tensor or isinstance(a, torch.Tensor):
        return a.dtype, not a.data_ptr() & 15
    if t is int:
        return a == 1, not a & 15, -_I32 <= a < _I32, -_I64 <= a < _I64
    if t is bool or t is float or a is None:
        return t
    if hasattr(a, "block_shape") and hasattr(a, "base"):        # a host-side TMA tensor descriptor
        return t, a.base.dtype, tuple(a.block_shape), a.layout
    raise TypeError(t)


_SITES: dict = {}   # kernel -> {key: (compiled kernel, its launcher, function, metadata, values after the args)}
_NONE: dict = {}


def _enabled(fn) -> bool:
    # a compiled JITFunction (not the interpreter's stand-in) on a CUDA device
    return _ON and hasattr(fn, "device_caches") and torch.cuda.is_available()


def launch_kernel(fn, grid, *args, **kw):
    """``fn[grid](*args, **kw)``; positional arguments are the kernel's leading parameters and keyword arguments
    the rest (constexprs and launch options), as at every call site of this package."""
    if not _enabled(fn) or callable(grid):
        return fn[grid](*args, **kw)
    dev = torch.cuda.current_device()
    try:
        key = (dev, tuple(map(_spec, args)), tuple(kw.items()))
        hit = _SITES.get(fn, _NONE).get(key)
    except TypeError:           # an argument this cache cannot key: Triton's own path
        return fn[grid](*args, **kw)
    if hit is None:
        return _first(fn, grid, args, kw, key)
    k, run, func, packed, tail = hit
    g = grid if len(grid) == 3 else (tuple(grid) + (1, 1))[:3]
    stream = torch._C._cuda_getCurrentRawStream(dev)
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    meta = k.launch_metadata(g, stream, *args, *tail) if enter is not None or leave is not None else None
    run(g[0], g[1], g[2], stream, func, packed, meta, enter, leave, *args, *tail)
    return k


def _first(fn, grid, args, kw, key):
    """Through Triton (compiles on a miss, checks everything); then cache the compiled kernel with the values of
    the parameters after the positional ones (fixed by the key: keyword arguments and defaults)."""
    k = fn[grid](*args, **kw)
    if k is None or hasattr(k, "result") or not hasattr(k, "run") or not hasattr(k, "packed_metadata"):
        return k
    binder = fn.device_caches[key[0]][4]
    bound = list(binder(*args, **kw)[0].values())
    if len(bound) < len(args):
        return k
    _SITES.setdefault(fn, {})[key] = (k, k.run, k.function, k.packed_metadata, tuple(bound[len(args):]))
    return k
