"""Registers, spills and shared memory of the backward's dK/dV kernels for H100 (sm_90), without a GPU: for trying
tile configs and kernel changes on a machine with no GPU before spending device time on them.

    python benchmarks/tools/kernel_regs.py 32,128,8,3 64,128,8,2        # Triton _dkdv: BM,BN,num_warps,num_stages
    python benchmarks/tools/kernel_regs.py --gluon 3,4 --gluon-fwd      # the Gluon kernels (dK/dV ring depths)

Compiles ``moba.triton.bwd._dkdv`` as the GPU would for the kernels' benchmark shapes (bf16, 32/8 heads, D 128, two
chosen blocks per row; pointers and strides specialised as 16-divisible) with ``triton.compile`` for sm_90 and runs
Triton's own ``ptxas -v`` on the PTX; on an H100 this matched the GPU build's shared memory and its spills up to
ptxas's counting unit. ``--gluon`` does the same for ``moba.gluon.bwd_dkdv_sm90.dkdv_kernel`` at the given ring
depths, ``--gluon-fwd`` for ``moba.gluon.fwd_sm90``'s ``sparse_fwd_kernel`` and ``own_fwd_kernel`` (with and
without the fused gate); both need the Triton release the Gluon kernels were written for. Needs no CUDA device,
only Triton's NVIDIA backend (installed with triton). ``--ttgir FILE`` also writes the last kernel's TTGIR (where
``ttg.async_wait {num = 0}`` at the top of a loop means its loads are not overlapped with its math).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from moba.triton import bwd  # noqa: E402
from moba.triton.common import sm90_signature  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
POINTERS = {"Q": "bf16", "K": "bf16", "V": "bf16", "DO": "bf16", "LSE": "fp32", "DELTA": "fp32",
            "DK": "bf16", "DV_": "bf16", "ENT": "i32"}              # the other pointers are int64 tables
STRIDES = {"sq_t", "sq_h", "sk_t", "sk_h", "sv_t", "sv_h", "sdo_t", "sdo_h", "sdk_t", "sdk_h", "sdv_t", "sdv_h", "NB"}


def compile_dkdv(BM, BN, warps, stages, Hq=32, Hkv=8, D=128, S=2):
    """The Triton ``_dkdv`` at one tile config, compiled for sm_90."""
    fn = bwd._dkdv
    cexpr = dict(Hq=Hq, Hkv=Hkv, G=Hq // Hkv, S=S, D=D, DV=D, BM=BM, BN=BN, BD=D, BDV=D, PREC="tf32")
    sig, const, attrs = sm90_signature(fn, cexpr, POINTERS, STRIDES)
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})


def ptxas_stats(ptx):
    """(registers, spill store bytes, spill load bytes) that Triton's ptxas reports for sm_90a."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", path, "-o", os.devnull], capture_output=True,
                             text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    st, ld = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out).groups())
    return regs, st, ld


def row(name, kern):
    regs, st, ld = ptxas_stats(kern.asm["ptx"])
    print(f"| {name} | {regs} | {st} | {ld} | {kern.metadata.shared / 1024:.0f} |", flush=True)
    return kern.asm["ttgir"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*", default=None, help="Triton _dkdv tile configs (default: none with --gluon or "
                                                            "--gluon-fwd, else 32,128,8,3)")
    p.add_argument("--gluon", default=None, metavar="NS,NS..",
                   help="also the Gluon dK/dV kernel (moba.gluon.bwd_dkdv_sm90) with these ring depths")
    p.add_argument("--gluon-fwd", action="store_true", help="also the Gluon forward kernels (moba.gluon.fwd_sm90)")
    p.add_argument("--ttgir", default=None)
    a = p.parse_args()
    confs = a.configs or ([] if a.gluon or a.gluon_fwd else ["32,128,8,3"])
    print("| kernel (BM, BN, warps, stages) | registers | spill stores B | spill loads B | shared KiB |\n"
          "|---|---|---|---|---|")
    ttgir = None
    for c in confs:
        ttgir = row(f"_dkdv {c}", compile_dkdv(*map(int, c.split(","))))
    if a.gluon or a.gluon_fwd:
        from moba import gluon
        if not gluon.triton_supported():
            p.error(f"the Gluon kernels compile with Triton {'.'.join(gluon.TRITON_VERSION)}.x; "
                    f"this is {triton.__version__}")
    for ns in (a.gluon.split(",") if a.gluon else []):
        from moba.gluon import bwd_dkdv_sm90
        ttgir = row(f"Gluon dkdv_kernel NS={ns}", bwd_dkdv_sm90.compile_sm90(NS=int(ns)))
    if a.gluon_fwd:
        from moba.gluon import fwd_sm90
        ttgir = row("Gluon sparse_fwd_kernel", fwd_sm90.compile_sm90())
        ttgir = row("Gluon own_fwd_kernel", fwd_sm90.compile_sm90(own=True))
        ttgir = row("Gluon own_fwd_kernel, gate", fwd_sm90.compile_sm90(own=True, gate=True))
    if a.ttgir and ttgir:
        with open(a.ttgir, "w") as f:
            f.write(ttgir)


if __name__ == "__main__":
    main()
