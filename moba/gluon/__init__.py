"""sm_90 (H100/H200) kernels in Gluon, Triton's lower-level language: the forward's own-block and chosen-block
kernels (``fwd_sm90``) and the backward's dK/dV kernel (``bwd_dkdv_sm90``), warp-specialized and fed by TMA.

Gluon is experimental and its API moves between Triton releases: the kernels were written and tested with
Triton 3.6, so they run only there (``supported``); elsewhere the "gluon" backend is refused with a ValueError and
"auto" takes the Triton kernels. Nothing here imports Gluon until a kernel is launched.
"""
from __future__ import annotations

import functools

import torch

TRITON_VERSION = ("3", "6")   # the Triton release whose Gluon API these kernels use


@functools.lru_cache(maxsize=None)
def triton_supported() -> bool:
    """Whether the installed Triton is the release the Gluon kernels were written for."""
    try:
        import triton
    except ImportError:
        return False
    return tuple(triton.__version__.split(".")[:2]) == TRITON_VERSION


def supported(device) -> bool:
    """Whether the Gluon kernels can run on ``device``: CUDA sm_90 and the Triton they were written for."""
    device = torch.device(device)
    return (device.type == "cuda" and triton_supported()
            and torch.cuda.get_device_capability(device) == (9, 0))


def usable(q: torch.Tensor, D: int, DV: int, *tensors: torch.Tensor) -> bool:
    """Inputs the Gluon kernels take (elsewhere the Triton kernels run): ``supported`` device, 16-bit, D == DV in
    (64, 128), and 16-byte aligned rows of q and of ``tensors`` (``cp.async`` and TMA copy 16 bytes at a time)."""
    aligned = all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1])
                  for t in (q,) + tensors)
    return (q.dtype in (torch.bfloat16, torch.float16) and D == DV and D in (64, 128) and aligned
            and supported(q.device))
