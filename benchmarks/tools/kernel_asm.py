"""What the compiler made of each MoBA kernel on a GPU: registers, spills, shared memory, and how many tensor-core
(wgmma / mma.sync) and asynchronous-copy (cp.async, TMA) instructions its PTX holds. For checking, after a kernel
or Triton change, that the kernels still use the instructions their speed relies on (``kernel_regs.py`` does the
same without a GPU for a few kernels).

    python benchmarks/tools/kernel_asm.py [--case fb32k] [--backend auto] [--decode]

Runs one call of a ``benchmarks/run.py`` case (forward and backward for an ``fb`` case; ``--decode`` also one decode
step) with the default tile configs, then prints one line per kernel compiled in this process: the Triton kernels
of ``moba.triton`` and, where the backend ran them, the Gluon ones of ``moba.gluon``.
"""
from __future__ import annotations

import argparse
import pathlib
import re
import sys

import torch
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))     # benchmarks/: the case registry
import run  # noqa: E402

import moba  # noqa: E402
from moba.bench import step  # noqa: E402

PATTERNS = {"wgmma": r"wgmma\.mma_async", "mma.sync": r"\bmma\.sync", "cp.async": r"cp\.async\.(?:ca|cg)",
            "tma": r"cp\.async\.bulk", "atom": r"\b(?:atom|red)\.global"}
MODULES = ["moba.triton.gate", "moba.triton.grouping", "moba.triton.fwd", "moba.triton.bwd", "moba.triton.decode",
           "moba.gluon.fwd_sm90", "moba.gluon.bwd_dkdv_sm90"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="fb32k", help="an attention case of benchmarks/run.py")
    p.add_argument("--T", type=int, default=None, help="override the case's length")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--topk", type=int, default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--decode", action="store_true", help="also one decode step over the case's keys")
    a = p.parse_args()
    c = run.case(a.case, T=a.T, block_size=a.block_size, topk=a.topk)
    q, k, v, do = run.inputs(c, "cuda", torch.bfloat16)
    step(lambda x, y, z: moba.moba_attention(x, y, z, c.block_size, c.topk, backend=a.backend), q, k, v, do)()
    if a.decode:
        with torch.no_grad():
            moba.moba_attention(q[:, -1:].detach(), k.detach(), v.detach(), c.block_size, c.topk, backend=a.backend)
    torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()}: {c.name} ({c.mode}), backend {a.backend}")
    print("| kernel | regs | spills | shared KiB | " + " | ".join(PATTERNS) + " |")
    print("|---|---|---|---|" + "---|" * len(PATTERNS))
    for name in MODULES:
        mod = sys.modules.get(name)          # a module never imported ran no kernel
        if mod is None:
            continue
        for kname, fn in sorted(vars(mod).items()):
            if not isinstance(fn, JITFunction):
                continue
            for cache in fn.device_caches.values():
                for kern in cache[0].values():
                    ptx = kern.asm.get("ptx", "")
                    counts = [len(re.findall(pat, ptx)) for pat in PATTERNS.values()]
                    print(f"| {name.rsplit('.', 1)[-1]}.{kname} | {kern.n_regs} | {kern.n_spills} | "
                          f"{kern.metadata.shared / 1024:.0f} | " + " | ".join(map(str, counts)) + " |")


if __name__ == "__main__":
    main()
