"""Registers, spills and shared memory of ``_dkdv`` for H100 (sm_90) tile configs, without a GPU.

    python benchmarks/kernel_regs.py 32,128,8,3 64,128,8,2        # BM,BN,num_warps,num_stages each

Compiles the kernel as the GPU would for the issue's shapes (bf16, 32/8 heads, D 128, block 512, topk 3;
pointers and strides specialised as 16-divisible) with ``triton.compile`` for sm_90 and runs Triton's own
``ptxas -v`` on the PTX. On an H100 (PERFLOG entries 26-27) it matched the GPU build's shared memory
(113 KiB at 32,128,8,3) and its spills up to the counting unit. Needs no CUDA device, only Triton's
NVIDIA backend (installed with triton). ``--ttgir FILE`` also writes the last config's TTGIR (where
``ttg.async_wait {num = 0}`` at the top of a loop means its loads are not overlapped with its math).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from moba.ops import parallel  # noqa: E402
from moba.ops.utils import sm90_signature  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
POINTERS = {"Q": "bf16", "K": "bf16", "V": "bf16", "DO": "bf16", "LSE": "fp32", "DELTA": "fp32",
            "DK": "bf16", "DV_": "bf16", "ENT": "i32"}              # the other pointers are int64 tables
STRIDES = {"sq_t", "sq_h", "sk_t", "sk_h", "sv_t", "sv_h", "sdo_t", "sdo_h", "sdk_t", "sdk_h", "sdv_t", "sdv_h", "NB"}


def compile_dkdv(BM, BN, warps, stages, Hq=32, Hkv=8, D=128, S=2):
    """(registers, spill store bytes, spill load bytes, shared bytes, ttgir) of one config."""
    fn = parallel._dkdv
    cexpr = dict(Hq=Hq, Hkv=Hkv, G=Hq // Hkv, S=S, D=D, DV=D, BM=BM, BN=BN, BD=D, BDV=D, PREC="tf32")
    sig, const, attrs = sm90_signature(fn, cexpr, POINTERS, STRIDES)
    kern = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})
    regs, st, ld = ptxas_stats(kern.asm["ptx"])
    return regs, st, ld, kern.metadata.shared, kern.asm["ttgir"]


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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*", default=["32,128,8,3"])
    p.add_argument("--ttgir", default=None)
    p.add_argument("--gluon", default=None, metavar="NS,NS..",
                   help="also the Gluon kernel (gluon_dkdv.py) with these ring depths")
    a = p.parse_args()
    print("| config (BM, BN, warps, stages) | registers | spill stores B | spill loads B | shared KiB |\n"
          "|---|---|---|---|---|")
    for c in a.configs:
        regs, st, ld, shared, ttgir = compile_dkdv(*map(int, c.split(",")))
        print(f"| {c} | {regs} | {st} | {ld} | {shared / 1024:.0f} |", flush=True)
    for ns in (a.gluon.split(",") if a.gluon else []):
        from moba.ops import gluon_dkdv
        kern = gluon_dkdv.compile_sm90(NS=int(ns))
        regs, st, ld = ptxas_stats(kern.asm["ptx"])
        print(f"| Gluon NS={ns} | {regs} | {st} | {ld} | {kern.metadata.shared / 1024:.0f} |", flush=True)
        ttgir = kern.asm["ttgir"]
    if a.ttgir:
        with open(a.ttgir, "w") as f:
            f.write(ttgir)


if __name__ == "__main__":
    main()
