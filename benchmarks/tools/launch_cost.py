"""The host's cost per kernel launch (CUDA): for each launch of one fwd8k call, one fb8k call and one decode step
over a 128K cache, the time to issue it through Triton's ``kernel[grid](...)``, through the compiled kernel's
launcher called directly, through ``moba.triton.launch.launch_kernel`` with its cache on, and Triton's argument
binding alone; then each whole call's issue time with the cache off and on. The GPU is held busy (a spin kernel
ahead) so that no launch waits on it.

    python benchmarks/tools/launch_cost.py [--cases fwd8k,fb8k,decode128k] [--n 300]
"""
import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))     # benchmarks/: the case registry
import run  # noqa: E402

import moba  # noqa: E402
import moba.triton.launch as ML  # noqa: E402


def recorded_launches(f):
    """The launches of one call of f through Triton's JITFunction.run: (kernel, args, grid, kwargs, compiled)."""
    from triton.runtime.jit import JITFunction
    rec, orig, was = [], JITFunction.run, ML._ON

    def spy(self, *args, grid, warmup, **kw):
        k = orig(self, *args, grid=grid, warmup=warmup, **kw)
        if not warmup:
            rec.append((self, args, grid, dict(kw), k))
        return k
    ML._ON = False
    try:
        f()
        torch.cuda.synchronize()
        JITFunction.run = spy
        f()
    finally:
        JITFunction.run, ML._ON = orig, was
    return rec


def per_call_us(fn, n):
    torch.cuda._sleep(int(2e8))
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    d = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return d


def issue_us(f):
    hs = []
    for _ in range(5):
        torch.cuda._sleep(int(2e8))
        t = time.perf_counter()
        f()
        hs.append((time.perf_counter() - t) * 1e6)
        torch.cuda.synchronize()
    return sorted(hs)[2]


def study(name, f, n):
    from triton.runtime import driver
    launches = recorded_launches(f)
    dev = torch.cuda.current_device()
    was = ML._ON
    ML._ON = False
    off = issue_us(f)
    ML._ON = True
    f()
    on = issue_us(f)
    ML._ON = was
    print(f"== {name}: {len(launches)} launches; whole call issued in {off:.0f} us through Triton, {on:.0f} us "
          f"with launch_kernel's cache", flush=True)
    tot = [0.0] * 3
    for jf, args, grid, kw, k in launches:
        g = tuple(grid(None) if callable(grid) else grid) + (1, 1)
        binder = jf.device_caches[dev][4]
        vals = tuple(binder(*args, **kw)[0].values())
        st = driver.active.get_current_stream(dev)
        t_jit = per_call_us(lambda: jf[grid](*args, **kw), n)
        t_run = per_call_us(lambda: k.run(g[0], g[1], g[2], st, k.function, k.packed_metadata, None, None, None,
                                          *vals), n)
        t_bind = per_call_us(lambda: binder(*args, **kw), n)
        ML._ON = True
        t_lk = per_call_us(lambda: ML.launch_kernel(jf, grid, *args, **kw), n) if not callable(grid) else float("nan")
        ML._ON = was
        for i, t in enumerate((t_jit, t_run, t_lk)):
            tot[i] += t
        print(f"  {jf.fn.__name__:26s} {len(vals):3d} args: kernel[grid] {t_jit:6.1f}  launcher {t_run:6.1f}  "
              f"launch_kernel {t_lk:6.1f}  (binding {t_bind:5.1f}) us", flush=True)
    print(f"  sum: kernel[grid] {tot[0]:.0f} us, launcher {tot[1]:.0f} us, launch_kernel {tot[2]:.0f} us",
          flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="fwd8k,fb8k,decode128k")
    ap.add_argument("--n", type=int, default=300, help="launches per timing")
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    torch.manual_seed(0)
    for name in a.cases.split(","):
        if name == "decode128k":      # B=1, contiguous cache, block 4096, topk 12, the new key appended
            T, Hq, Hkv, D = 128 * 1024, 32, 8, 128
            kc = torch.randn(1, T, Hkv, D, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            lens = torch.full((1,), T - 1, dtype=torch.int32, device="cuda")
            sums = moba.cache_key_sums(kc, 4096, cache_seqlens=lens)
            q = torch.randn(1, 1, Hq, D, device="cuda", dtype=torch.bfloat16)
            kn, vn = torch.randn(2, 1, 1, Hkv, D, device="cuda", dtype=torch.bfloat16).unbind(0)

            def f():
                return moba.moba_attention_with_kvcache(q, kc, vc, 4096, 12, cache_seqlens=lens, k_new=kn,
                                                        v_new=vn, key_sums=sums)
        else:
            c = run.case(name)
            q, k, v, do = run.inputs(c, "cuda", torch.bfloat16)
            if c.fwd_bwd:
                q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
                do = torch.randn_like(q) if do is None else do

                def f():
                    return torch.autograd.grad(moba.moba_attention(q, k, v, c.block_size, c.topk), (q, k, v), do)
            else:
                def f():
                    return moba.moba_attention(q, k, v, c.block_size, c.topk)
        study(name, f, a.n)


if __name__ == "__main__":
    main()
