"""Where one forward+backward of MoBA goes with small blocks at the same sparsity (CUDA): the retrieval
experiments' attention shape (16K tokens x batch 4, 4 query / 2 KV heads, D 64, bf16), blocks of 128, 64
and 32 with 12, 24 and 48 chosen blocks. Prints `moba.bench.profile_call`'s host and per-kernel GPU times."""
import argparse

import torch

import moba
from moba.bench import profile_call


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--configs", default="128:12,64:24,32:48", help="block:topk,...")
    p.add_argument("--shape", default="4,16384,4,2,64", help="B,T,Hq,Hkv,D")
    a = p.parse_args()
    B, T, Hq, Hkv, D = (int(x) for x in a.shape.split(","))
    torch.manual_seed(0)
    kw = dict(device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = torch.randn(B, T, Hq, D, **kw), torch.randn(B, T, Hkv, D, **kw), torch.randn(B, T, Hkv, D, **kw)
    for c in a.configs.split(","):
        bs, topk = (int(x) for x in c.split(":"))
        print(f"block {bs}, topk {topk}: B={B} T={T} Hq={Hq} Hkv={Hkv} D={D} bf16, forward+backward", flush=True)
        profile_call(lambda: moba.moba_attention(q, k, v, bs, topk).sum().backward(), top=10)


if __name__ == "__main__":
    main()
