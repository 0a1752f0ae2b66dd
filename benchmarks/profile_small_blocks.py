"""Where one forward+backward of MoBA goes with small blocks at the same sparsity (CUDA): the retrieval
experiments' attention shape (16K tokens x batch 4, 4 query / 2 KV heads, D 64, bf16), blocks of 128, 64
and 32 with 12, 24 and 48 chosen blocks. Prints `moba.bench.profile_call`'s host and per-kernel GPU times, and
the peak memory of one forward+backward (allocated above the inputs) against SDPA's cuDNN backend."""
import argparse

import torch
from torch.nn.attention import SDPBackend

import moba
from moba.bench import dense_causal, peak_bytes, profile_call


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
        step = lambda: moba.moba_attention(q, k, v, bs, topk).sum().backward()   # noqa: E731
        profile_call(step, top=10)
        for x in (q, k, v):
            x.grad = None
        m = peak_bytes(step, q.device) / 2**30
        for x in (q, k, v):
            x.grad = None
        try:
            cudnn = lambda: dense_causal(q, k, v, SDPBackend.CUDNN_ATTENTION).sum().backward()   # noqa: E731
            c = peak_bytes(cudnn, q.device) / 2**30
        except RuntimeError as e:
            print("  cuDNN failed:", str(e).splitlines()[0][:120])
            c = float("nan")
        for x in (q, k, v):
            x.grad = None
        print(f"  peak GiB (forward+backward, above the inputs): MoBA {m:.3f}, cuDNN {c:.3f} ({m / c:.2f}x)",
              flush=True)


if __name__ == "__main__":
    main()
