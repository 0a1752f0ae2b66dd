"""``moba bench``: MoBA against dense causal attention (PyTorch SDPA) across sequence lengths, on the CPU or a GPU.

Also the measurement helpers that ``benchmarks/run.py`` (the GPU case registry) and ``benchmarks/tools/`` share:
timing (``time_ms``, ``measure``), peak memory (``peak_bytes``), CUDA-graph replay (``cuda_graph``), the host/GPU
split of a call (``profile_call``), the dense baselines (``sdpa``, ``dense_variants``), the share of causal pairs
MoBA reads (``pair_fraction``) and provenance (``source_commit``, ``card``, ``versions``, ``append_jsonl``).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from .api import moba_attention, resolve_backend
from .naive import naive_moba_attention

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def source_commit(path=None) -> str:
    """Short commit of the checkout, with "+modified" when tracked files differ from it (a copied working
    tree whose git metadata is older than its files reads so), or "unknown" without git. ``MOBA_SOURCE_COMMIT``
    in the environment overrides it (a device machine's copy of the tree can carry stale git metadata)."""
    import subprocess
    if os.environ.get("MOBA_SOURCE_COMMIT"):
        return os.environ["MOBA_SOURCE_COMMIT"]
    cwd = str(path or pathlib.Path(__file__).resolve().parents[1])
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=cwd,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=cwd, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+modified" if dirty else "")) if head else "unknown"


def pair_fraction(T: int, block_size: int, topk: int) -> float:
    """Share of the causal (query, key) pairs that MoBA reads, for one sequence of T tokens."""
    p = torch.arange(T, dtype=torch.float64)
    own = torch.remainder(p, block_size) + 1
    past = torch.clamp(torch.div(p, block_size, rounding_mode="floor"), max=topk - 1) * block_size
    return float((own + past).sum() / (p + 1).sum())


def profile_call(fn, top: int = 14) -> dict:
    """CUDA: where one call of ``fn`` spends its time. ``host_ms``: the CPU time to issue the call while
    the GPU is held busy (median of 5; so no launch waits on the GPU); ``gpu_kernel_ms``: the GPU time of
    its kernels (torch.profiler). host_ms above gpu_kernel_ms means the call is bound by the host."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    hs = []
    for _ in range(5):
        torch.cuda._sleep(int(1e8))          # ~50 ms of GPU spin ahead of the call
        t = time.perf_counter()
        fn()
        hs.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
    host_ms = sorted(hs)[2]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pr:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    ev = sorted((e for e in pr.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA),
                key=lambda e: -e.device_time_total)
    gpu_ms = sum(e.device_time_total for e in ev) / 5 / 1e3
    print(f"  host {host_ms:.3f} ms/call to issue; GPU kernels {gpu_ms:.3f} ms/call, "
          f"{sum(e.count for e in ev) / 5:.0f} launches/call", flush=True)
    for e in ev[:top]:
        print(f"    {e.device_time_total / 5 / 1e3:8.3f} ms  x{e.count // 5:<3d} {e.key[:90]}", flush=True)
    return dict(host_ms=host_ms, gpu_kernel_ms=gpu_ms,
                kernels={e.key[:90]: e.device_time_total / 5 / 1e3 for e in ev[:top]})


def cuda_graph(fn, warmup: int = 3):
    """fn captured in a CUDA graph after warm-up calls on a side stream: (replay, the captured call's output).
    Replaying reruns fn's kernels on whatever its input tensors hold then, without any host work but one
    launch: what a caller that captures its step (torch.compile's "reduce-overhead", a serving engine) pays."""
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(st)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g.replay, out


def _mallopt(mmap_threshold: int) -> None:
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_threshold)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, mmap_threshold)   # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(key)


def peak_bytes(fn, device) -> float:
    """Peak memory of one untimed call of fn, above what was allocated before it.

    CUDA: the caching allocator's peak. CPU (Linux, glibc): the process's peak RSS while large blocks are
    served by mmap and returned on free, so that RSS follows live tensors; NaN where that can't be read.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    try:
        _mallopt(1 << 16)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                   # resets VmHWM to the current RSS
        base = _status("VmRSS")
        fn()
        return float(_status("VmHWM") - base)
    except OSError:
        return float("nan")
    finally:
        _mallopt(32 << 20)                 # back to glibc's largest dynamic threshold for timing


def time_ms(fn, device, repeats=3, long=False) -> float:
    """Median milliseconds of ``fn()``. CUDA: ``triton.testing.do_bench`` (warm-up, L2 flushed between calls);
    ``long`` calls (seconds each, where do_bench's own estimate would take several): one warm-up, then the median
    of ``repeats`` calls timed with CUDA events. CPU: one warm-up, then the median of ``repeats`` calls."""
    device = torch.device(device)
    if device.type == "cuda" and not long:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=max(100, 50 * repeats), return_mode="median")
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def measure(fn, device, repeats=3, long=False) -> tuple[float, float]:
    """(``time_ms``, ``peak_bytes``) of fn. Long CUDA calls read the peak over the timed calls themselves rather
    than spend one more call on it (fn must leave nothing allocated behind, so that every call peaks alike)."""
    device = torch.device(device)
    if device.type == "cuda" and long:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = time_ms(fn, device, repeats, long=True)
        return ms, float(torch.cuda.max_memory_allocated() - base)
    return time_ms(fn, device, repeats), peak_bytes(fn, device)


def sdpa(q, k, v, backend=None, causal=True, mask=None):
    """SDPA over [B, T, H, D] inputs (GQA through enable_gqa, no copy where supported); ``backend`` an
    ``SDPBackend`` to force one kernel, None for PyTorch's own choice."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if backend is None:
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal,
                                              enable_gqa=True).transpose(1, 2)
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal,
                                              enable_gqa=True).transpose(1, 2)


def dense_causal(q, k, v, backend=None):
    """SDPA causal over [B, T, H, D] inputs."""
    return sdpa(q, k, v, backend)


def step(f, q, k, v, do=None):
    """One timed call of ``f(q, k, v)``: its forward without autograd, or with ``do`` its forward and backward.
    The gradients are returned (torch.autograd.grad), not accumulated into ``.grad``: every call then allocates
    and frees alike, so that its peak memory is the same on each call and counts the gradients."""
    if do is None:
        def call():
            with torch.no_grad():
                return f(q, k, v)
    else:
        def call():
            return torch.autograd.grad(f(q, k, v), (q, k, v), do)
    return call


def dense_variants(device, decode=False) -> dict:
    """The dense attentions MoBA is compared with, by name: on CUDA SDPA's cuDNN and flash kernels (for a decode
    step also the memory-efficient kernel and PyTorch's own choice, since which is fastest there varies with the
    cache); elsewhere SDPA as PyTorch dispatches it."""
    if torch.device(device).type != "cuda":
        return {"sdpa": None}
    from torch.nn.attention import SDPBackend
    names = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    if decode:
        names = {"sdpa": None, **names, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    return names


def card(device) -> str:
    """The GPU's name, or the CPU's."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def versions() -> dict:
    """Versions a timing depends on: torch, Triton (None without it), CUDA and cuDNN (None on CPU-only builds)."""
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return dict(torch=torch.__version__, triton=tv, cuda_version=torch.version.cuda, cudnn_version=cudnn)


def json_safe(x):
    """x with NaN and infinite floats as None (strict JSON has neither)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def append_jsonl(path, rows) -> None:
    """Append one JSON object per row to ``path`` (created with its folder if missing)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(json_safe(r)) + "\n")


def run(lengths, block_size, topk, heads, kv_heads, head_dim, dtype, backend, device, batch=1, repeats=3,
        fwd_bwd=False, ref_max=8192, seed=0, graph=False, log=sys.stderr):
    """One row per length: each dense variant's and MoBA's median ms and peak memory, MoBA's speedup over the
    fastest dense variant, and its error against the fp64 reference up to ``ref_max``. ``graph`` (CUDA, forward):
    also every call replayed from a CUDA graph (`cuda_graph`: the kernels without the host's launch work), and
    MoBA's speedup so."""
    device = torch.device(device)
    if graph and (device.type != "cuda" or fwd_bwd):
        raise ValueError(f"graph: CUDA graphs are timed for the forward on a CUDA device, got device={device}, "
                         f"fwd_bwd={fwd_bwd}")
    dt = DTYPES[dtype]
    be = resolve_backend(backend, torch.empty(1, 1, heads, head_dim, device=device, dtype=dt))
    rows = []
    for i, T in enumerate(lengths):
        torch.manual_seed(seed)
        shp = lambda h: (batch, T, h, head_dim)  # noqa: E731
        q = torch.randn(shp(heads), device=device, dtype=dt)
        k = torch.randn(shp(kv_heads), device=device, dtype=dt)
        v = torch.randn(shp(kv_heads), device=device, dtype=dt)
        do = None
        if fwd_bwd:
            for x in (q, k, v):
                x.requires_grad_(True)
            do = torch.randn_like(q)
        timed = lambda f: step(f, q, k, v, do)  # noqa: E731

        row = dict(T=T, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                   block_size=block_size, topk=topk, backend=be, device=str(device), fwd_bwd=fwd_bwd,
                   frac_pairs=pair_fraction(T, block_size, topk))
        for name, sdpa_backend in dense_variants(device).items():
            print(f"[{i + 1}/{len(lengths)}] T={T}: dense ({name}) ...", file=log, flush=True)
            try:
                fn = timed(lambda a, b, c: dense_causal(a, b, c, sdpa_backend))
                row[f"{name}_ms"] = time_ms(fn, device, repeats)
                row[f"{name}_peak_bytes"] = peak_bytes(fn, device)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:   # a backend that can't run this shape
                print(f"    {name} unavailable: {str(e).splitlines()[0][:100]}", file=log)
                row[f"{name}_ms"] = float("nan")
            if graph:
                row[f"{name}_graph_ms"] = (time_ms(cuda_graph(fn)[0], device, repeats) if not math.isnan(row[f"{name}_ms"])
                                           else float("nan"))
        dense_ms = [row[f"{n}_ms"] for n in dense_variants(device) if not math.isnan(row[f"{n}_ms"])]
        row["dense_ms"] = min(dense_ms) if dense_ms else float("nan")
        print(f"[{i + 1}/{len(lengths)}] T={T}: moba ({be}) ...", file=log, flush=True)
        fn = timed(lambda a, b, c: moba_attention(a, b, c, block_size, topk, backend=be))
        row["moba_ms"] = time_ms(fn, device, repeats)
        row["moba_peak_bytes"] = peak_bytes(fn, device)
        row["speedup"] = row["dense_ms"] / row["moba_ms"]
        if graph:
            row["moba_graph_ms"] = time_ms(cuda_graph(fn)[0], device, repeats)
            g_ms = [row[f"{n}_graph_ms"] for n in dense_variants(device)]
            row["dense_graph_ms"] = min((x for x in g_ms if not math.isnan(x)), default=math.nan)
            row["speedup_graph"] = row["dense_graph_ms"] / row["moba_graph_ms"]
        row["rel_err"] = float("nan")
        if T <= ref_max:   # the fp64 reference on the first kv head's group (it materialises T x T)
            G = heads // kv_heads
            with torch.no_grad():
                out = moba_attention(q, k, v, block_size, topk, backend=be)[:, :, :G].double()
                ref = naive_moba_attention(q[:, :, :G].double(), k[:, :, :1].double(), v[:, :, :1].double(),
                                           block_size, topk)
            row["rel_err"] = ((out - ref).norm() / ref.norm()).item()
        rows.append(row)
    return rows


def format_table(rows) -> str:
    dense_cols = [c[:-3] for c in rows[0] if c.endswith("_ms") and not c.endswith("_graph_ms")
                  and c not in ("dense_ms", "moba_ms")]
    graph = "moba_graph_ms" in rows[0]
    head = (["T"] + [f"{c} ms" for c in dense_cols] + ["moba ms", "speedup"]
            + ([f"{c} graph ms" for c in dense_cols] + ["moba graph ms", "speedup (graphs)"] if graph else [])
            + ["pairs read", "dense peak MB", "moba peak MB", "rel err"])
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        peak_d = max(r.get(f"{c}_peak_bytes", float("nan")) for c in dense_cols) / 2**20
        cells = ([str(r["T"])] + [f"{r[c + '_ms']:.2f}" for c in dense_cols]
                 + [f"{r['moba_ms']:.2f}", f"{r['speedup']:.2f}x"]
                 + ([f"{r[c + '_graph_ms']:.3f}" for c in dense_cols]
                    + [f"{r['moba_graph_ms']:.3f}", f"{r['speedup_graph']:.2f}x"] if graph else [])
                 + [f"{100 * r['frac_pairs']:.1f}%", f"{peak_d:.0f}", f"{r['moba_peak_bytes'] / 2**20:.0f}",
                    "-" if math.isnan(r["rel_err"]) else f"{r['rel_err']:.1e}"])
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def add_arguments(p):
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated sequence lengths (default: 4096,8192,16384,32768 on CPU; "
                        "8192,32768,131072 on CUDA)")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--heads", type=int, default=None, help="query heads (default 4 on CPU, 32 on CUDA)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: 4 on CPU, 8 on CUDA)")
    p.add_argument("--head-dim", type=int, default=None, help="default 64 on CPU, 128 on CUDA")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--backend", choices=["auto", "torch", "triton", "gluon", "naive"], default="auto")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--fwd-bwd", action="store_true", help="time forward + backward instead of forward")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed calls on the CPU (median reported); on CUDA, do_bench runs max(100, 50 * repeats) ms")
    p.add_argument("--ref-max", type=int, default=8192, help="longest T checked against the reference")
    p.add_argument("--graph", action="store_true",
                   help="CUDA, forward: also time every call replayed from a CUDA graph (the kernels without the "
                        "host's launch work: what torch.compile's reduce-overhead mode or a serving engine pays)")
    p.add_argument("--json", default=None, help="write the rows and the environment to this JSON file")


def main_bench(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    args.lengths = args.lengths or ([8192, 32768, 131072] if gpu else [4096, 8192, 16384, 32768])
    args.heads = args.heads or (32 if gpu else 4)
    args.kv_heads = args.kv_heads or (8 if gpu else args.heads)
    args.head_dim = args.head_dim or (128 if gpu else 64)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    env = dict(device=card(device), **versions(), threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"),
               commit=source_commit(), backend=args.backend)
    print(f"moba bench on {env['device']} (torch {env['torch']}): B={args.batch} H={args.heads}/"
          f"{args.kv_heads} D={args.head_dim} {args.dtype} block={args.block_size} topk={args.topk} "
          f"{'fwd+bwd' if args.fwd_bwd else 'fwd'}", flush=True)
    rows = run(args.lengths, args.block_size, args.topk, args.heads, args.kv_heads, args.head_dim, args.dtype,
               args.backend, device, batch=args.batch, repeats=args.repeats, fwd_bwd=args.fwd_bwd,
               ref_max=args.ref_max, graph=args.graph)
    env["backend_used"] = rows[0]["backend"] if rows else None
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_safe({"env": env, "rows": rows}), f, indent=1)
    return rows
