"""What the compiler made of each Triton kernel (GPU only): registers, spills, shared memory, and how many
tensor-core (wgmma / mma.sync) and asynchronous-copy (cp.async, TMA) instructions its PTX holds.

    python benchmarks/kernel_asm.py [--T 32768] [--block 512] [--topk 3]

Runs one forward+backward with the default tile configs, then prints one line per compiled kernel."""
from __future__ import annotations

import argparse
import re
import sys

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
import moba  # noqa: E402
from moba.ops import decode, parallel  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

PATTERNS = {"wgmma": r"wgmma\.mma_async", "mma.sync": r"\bmma\.sync", "cp.async": r"cp\.async\.(?:ca|cg)",
            "tma": r"cp\.async\.bulk", "atom": r"\b(?:atom|red)\.global"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=32768)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--topk", type=int, default=3)
    a = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, a.T, h, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (32, 8, 8))
    moba.moba_attention(q, k, v, block_size=a.block, topk=a.topk).sum().backward()
    torch.cuda.synchronize()
    print("| kernel | regs | spills | shared KiB | " + " | ".join(PATTERNS) + " |")
    print("|---|---|---|---|" + "---|" * len(PATTERNS))
    for mod in (parallel, decode):
        for name, fn in sorted(vars(mod).items()):
            if not isinstance(fn, JITFunction):
                continue
            for cache in fn.device_caches.values():
                for kern in cache[0].values():
                    ptx = kern.asm.get("ptx", "")
                    counts = [len(re.findall(pat, ptx)) for pat in PATTERNS.values()]
                    print(f"| {name} | {kern.n_regs} | {kern.n_spills} | {kern.metadata.shared / 1024:.0f} | "
                          + " | ".join(map(str, counts)) + " |")


if __name__ == "__main__":
    main()
