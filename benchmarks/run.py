"""The benchmark runner: named cases of MoBA against the fastest dense attention, one table, one JSONL line per case.

    python benchmarks/run.py [--cases NAMES] [--backend auto,triton,gluon,torch] [--graph] [--profile]
                             [--repeats N] [--out PATH | --no-record] [--list] [--smoke]

    python benchmarks/run.py --cases fwd8k,fb32k             # two attention cases, MoBA's "auto" backend
    python benchmarks/run.py --cases issue --backend triton,gluon --graph
    python benchmarks/run.py --list                          # the cases and groups
    python benchmarks/run.py --smoke                         # tiny cases on any device (the CPU too), nothing recorded

Every case times MoBA with each chosen backend and the dense baselines in the same process, on the same inputs:
SDPA's cuDNN and flash kernels for attention cases, the fastest of SDPA's kernels for a decode step
(``moba.bench.dense_variants``); on the CPU, SDPA as PyTorch dispatches it. Per case it reports the median time
(``moba.bench.time_ms``: ``triton.testing.do_bench``, or CUDA events for calls of seconds), the peak memory the call
allocates above its inputs (``torch.cuda.max_memory_allocated``), TFLOP/s of the (query, key) pairs each side
actually computes (decode steps: GB/s of the keys and values read), the speedup over the fastest dense, and with
``--graph`` the same calls replayed from CUDA graphs (the kernels without the host's launch work).

The table goes to stdout with the card, versions, dtype and commit; one JSON object per (case, backend) is appended
to ``benchmarks/results/kernels.jsonl`` (attention cases) or ``decode.jsonl`` (decode steps), or to ``--out``.
Smoke cases are recorded only with ``--out``.

Nsight Compute on one case's MoBA kernels (no dense runs, nothing recorded; Gluon kernel names on sm_90)::

    ncu --clock-control none -k regex:"sparse_fwd|own_fwd" --launch-skip 6 --launch-count 3 --set full -o fwd8k \\
        python3 benchmarks/run.py --cases fwd8k --dense '' --no-record
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import shlex
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import moba  # noqa: E402
from moba.api import resolve_backend  # noqa: E402
from moba.bench import (DTYPES, append_jsonl, card, cuda_graph, dense_causal, dense_variants, measure,  # noqa: E402
                        pair_fraction, profile_call, sdpa, source_commit, step, time_ms, versions)

K, M = 1024, 1024 * 1024
RESULTS = ROOT / "benchmarks" / "results"
# Calls on this many tokens or more take seconds: timed by CUDA events (do_bench's estimate alone would take several
# calls), and neither replayed from a graph nor profiled (the host's share of them is nil).
LONG_TOKENS = 256 * K


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape. Attention cases: batch x T queries and keys, causal, forward or forward and backward.
    Decode cases: one query per cache against caches of ``lengths`` tokens (a packed batch; one cache of T tokens
    when empty), the gate's block means kept by a ``BlockMeansCache`` as during generation."""
    name: str
    T: int
    block_size: int
    topk: int
    fwd_bwd: bool = False
    decode: bool = False
    lengths: tuple = ()
    batch: int = 1
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    smoke: bool = False
    about: str = ""

    @property
    def family(self) -> str:
        return "decode" if self.decode else "kernels"

    @property
    def mode(self) -> str:
        return "decode" if self.decode else "fwd+bwd" if self.fwd_bwd else "fwd"

    @property
    def cache_lengths(self) -> list:
        return list(self.lengths) or [self.T]


def _registry() -> dict:
    cases = [
        # the kernels' cases: bf16, batch 1, 32 query / 8 KV heads, head dim 128
        Case("fwd8k", 8 * K, 512, 3),
        Case("fb8k", 8 * K, 512, 3, fwd_bwd=True),
        Case("fwd32k", 32 * K, 512, 3),
        Case("fb32k", 32 * K, 512, 3, fwd_bwd=True),
        Case("fwd128k", 128 * K, 4096, 12),
        Case("fb128k", 128 * K, 512, 3, fwd_bwd=True),
        Case("fb128k_b4096", 128 * K, 4096, 12, fwd_bwd=True),
        Case("fwd512k", 512 * K, 4096, 12),
        Case("fwd1m", M, 4096, 12),
        Case("fb512k_b128", 512 * K, 128, 8, fwd_bwd=True, about="small blocks at long context"),
        Case("fb1m", M, 4096, 12, fwd_bwd=True, about="whether training at 1M fits one 80 GB card (try --dense '')"),
        # topk covers every block: MoBA computes dense causal attention, so the ratio is the kernels' own efficiency
        # against cuDNN's, and the outputs are compared (err_vs_dense)
        Case("dense32k", 32 * K, 4096, 8, about="topk = blocks: dense causal attention"),
        Case("dense_fb32k", 32 * K, 4096, 8, fwd_bwd=True, about="topk = blocks: dense causal attention"),
        # the retrieval experiments' attention: small blocks at one sparsity, batch 4 x 16K, 4 / 2 heads, D 64
        *[Case(f"fb16k_x4_b{bs}", 16 * K, bs, topk, fwd_bwd=True, batch=4, heads=4, kv_heads=2, head_dim=64,
               about="small blocks, same sparsity") for bs, topk in ((128, 12), (64, 24), (32, 48))],
        # decode steps: blocks of 4096, topk 12
        Case("decode128k", 128 * K, 4096, 12, decode=True),
        Case("decode1m", M, 4096, 12, decode=True, about="one step over a 1M-token cache"),
        Case("decode_batch", 0, 4096, 12, decode=True,
             lengths=(600, 2048, 7000, 16384, 32768, 70000, 131072, 250000),
             about="8 caches of mixed lengths, packed (cu_seqlens_k), one means cache for the batch"),
    ]
    for T in (8 * K, 32 * K, 128 * K, 512 * K, M):      # forward time against length at two sparsities
        cases.append(Case(f"sweep4096_{T // K}k", T, 4096, 12))
        cases.append(Case(f"sweep512_{T // K}k", T, 512, 3))
    # tiny shapes that run on the CPU in a moment: the runner's own test
    tiny = dict(heads=4, kv_heads=2, head_dim=16, smoke=True)
    cases += [Case("tiny_fwd", 300, 64, 3, **tiny), Case("tiny_fb", 300, 64, 3, fwd_bwd=True, **tiny),
              Case("tiny_dense", 256, 64, 4, **tiny, about="topk = blocks"),
              Case("tiny_decode", 1000, 64, 3, decode=True, **tiny),
              Case("tiny_decode_batch", 0, 64, 3, decode=True, lengths=(100, 300, 64, 500), **tiny)]
    return {c.name: c for c in cases}


CASES = _registry()
GROUPS = {
    "issue": ["fwd8k", "fb32k", "fwd512k", "fwd1m", "fb512k_b128", "decode1m", "decode_batch"],
    "short": ["fwd8k", "fb8k", "fwd32k", "fb32k", "dense32k", "dense_fb32k"],
    "long": ["fwd128k", "fb128k", "fb128k_b4096", "fwd512k", "fwd1m", "fb512k_b128"],
    "decode": ["decode128k", "decode1m", "decode_batch"],
    "small_blocks": [n for n in CASES if n.startswith("fb16k_x4_")],
    "sweep": [n for n in CASES if n.startswith("sweep")],
    "smoke": [n for n, c in CASES.items() if c.smoke],
}


def expand(names: str) -> list:
    """Case names and group names, comma-separated -> case names (each once, in order)."""
    out = []
    for n in (x.strip() for x in names.split(",")):
        if not n:
            continue
        if n not in CASES and n not in GROUPS:
            raise SystemExit(f"unknown case {n!r}; --list shows the cases and groups")
        for c in GROUPS.get(n, [n]):
            if c not in out:
                out.append(c)
    return out


def case(name: str, **overrides) -> Case:
    """A registered case, with fields replaced where ``overrides`` gives them (None: keep); for the tools."""
    return dataclasses.replace(CASES[name], **{k: v for k, v in overrides.items() if v is not None})


def inputs(c: Case, device, dtype, seed=0):
    """q [B, T, Hq, D], k and v [B, T, Hkv, D] of an attention case (requiring grad for forward and backward), and
    the output gradient (None for a forward)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(c.batch, c.T, h, c.head_dim, device=device, dtype=dtype, generator=g)
               .requires_grad_(c.fwd_bwd) for h in (c.heads, c.kv_heads, c.kv_heads))
    do = torch.randn(q.shape, device=device, dtype=dtype, generator=g) if c.fwd_bwd else None
    return q, k, v, do


def attention_flops(c: Case, frac: float) -> float:
    """Matmul FLOPs of ``frac`` of the causal pairs: 4 D per (query, key, head) forward, 3.5x that with the
    backward (its five matmuls, one of them the recomputed scores)."""
    return 4 * c.head_dim * c.heads * c.batch * frac * c.T * (c.T + 1) / 2 * (3.5 if c.fwd_bwd else 1.0)


def decode_min_keys(c: Case) -> int:
    """Keys a step must read for one kv head's selection, summed over the caches: the own block's keys and the
    topk - 1 chosen earlier blocks (the heads of a group may choose more, so this bounds the bytes from below)."""
    n_keys = 0
    for n in c.cache_lengths:
        nblk = -(-n // c.block_size)
        n_keys += (n - 1) % c.block_size + 1 + min(c.topk - 1, nblk - 1) * c.block_size
    return n_keys


def _err(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


class Runner:
    def __init__(self, args, device, log=sys.stderr):
        self.a, self.device, self.log = args, device, log
        self.cuda = device.type == "cuda"

    def say(self, msg):
        print(msg, file=self.log, flush=True)

    def timed(self, name, fn, long) -> dict:
        """``name``_ms and _peak_bytes of fn, and with --graph its replay's _graph_ms; NaN where it fails (a dense
        kernel that does not take the shape, memory)."""
        a, r = self.a, {}
        try:
            r[f"{name}_ms"], r[f"{name}_peak_bytes"] = measure(fn, self.device, a.repeats, long)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            self.say(f"    {name} failed: {str(e).splitlines()[0][:120]}")
            r[f"{name}_ms"] = r[f"{name}_peak_bytes"] = float("nan")
        if a.graph and self.cuda and not long:
            r[f"{name}_graph_ms"] = float("nan")
            if not math.isnan(r[f"{name}_ms"]):
                try:
                    replay, _ = cuda_graph(fn)
                    r[f"{name}_graph_ms"] = time_ms(replay, self.device, a.repeats)
                    del replay
                except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                    self.say(f"    {name} graph failed: {str(e).splitlines()[0][:120]}")
        if self.cuda:
            torch.cuda.empty_cache()
        return r

    def timing(self, long) -> str:
        if not self.cuda:
            return f"median of {self.a.repeats} calls"
        return f"median of {self.a.repeats} calls (CUDA events)" if long else "do_bench median"

    def dense_names(self, c: Case) -> dict:
        variants = dense_variants(self.device, decode=c.decode)
        keep = variants if self.a.dense is None else [n for n in self.a.dense.split(",") if n]
        return {n: b for n, b in variants.items() if n in keep}

    def backends(self, c: Case, dtype) -> list:
        """(requested, resolved) backends this case runs; one that can't run here is reported and left out."""
        probe = torch.empty(1, 1, c.heads, c.head_dim, device=self.device, dtype=dtype)
        out = []
        for b in self.a.backend.split(","):
            try:
                out.append((b, resolve_backend(b, probe, probe)))
            except ValueError as e:
                self.say(f"  {c.name}: backend {b} skipped: {e}")
        return out

    def attention_case(self, c: Case, dtype) -> list:
        a, dev = self.a, self.device
        long = self.cuda and c.batch * c.T >= LONG_TOKENS
        q, k, v, do = inputs(c, dev, dtype)
        frac = pair_fraction(c.T, c.block_size, c.topk)
        base = dict(T=c.T, frac_pairs=frac, timing=self.timing(long))
        dense = {}
        for name, sb in self.dense_names(c).items():
            if name == "flash" and c.T > a.flash_max:
                self.say(f"  {c.name}: flash not run above --flash-max {a.flash_max}")
                continue
            self.say(f"  {c.name}: dense ({name}) ...")
            dense.update(self.timed(name, step(lambda x, y, z: dense_causal(x, y, z, sb), q, k, v, do), long))
            dense[f"{name}_tflops"] = attention_flops(c, 1.0) / dense[f"{name}_ms"] / 1e9
        ref = None
        if c.topk >= -(-c.T // c.block_size):      # every block chosen: MoBA must equal dense causal attention
            with torch.no_grad():
                ref = dense_causal(q, k, v)
        rows = []
        for req, be in self.backends(c, dtype):
            self.say(f"  {c.name}: moba ({be}) ...")
            fn = step(lambda x, y, z: moba.moba_attention(x, y, z, c.block_size, c.topk, backend=be), q, k, v, do)
            row = dict(base, backend=be, backend_requested=req, **dense, **self.timed("moba", fn, long))
            row["moba_tflops"] = attention_flops(c, frac) / row["moba_ms"] / 1e9
            if ref is not None:
                with torch.no_grad():
                    row["err_vs_dense"] = _err(moba.moba_attention(q, k, v, c.block_size, c.topk, backend=be), ref)
            if not c.fwd_bwd and self.cuda and be in ("triton", "gluon"):
                row["gate_ms"] = self.gate_ms(c, q, k, long)
            if a.profile and self.cuda and not long:
                row.update(profile_call(fn))
            rows.append(row)
        return rows

    def gate_ms(self, c: Case, q, k, long) -> float:
        """The Triton gate alone (block means and top-k), as the "triton" backend runs it (the "gluon" one fuses
        it into the own-block kernel where a sequence has few blocks)."""
        from moba.layout import make_layout, pack
        from moba.triton import gate
        lay = make_layout(q, k, c.block_size)
        lt = lay.tensors(q.device)
        qp, kp = pack(q.detach()), pack(k.detach())
        return time_ms(lambda: gate.select_past_blocks(qp, kp, lay, lt, c.topk), self.device, self.a.repeats, long)

    def decode_case(self, c: Case, dtype) -> list:
        dev, lens = self.device, c.cache_lengths
        g = torch.Generator(device=dev).manual_seed(0)
        N, Tk, H, Hkv, D = len(lens), sum(lens), c.heads, c.kv_heads, c.head_dim
        q = torch.randn(1, N, H, D, device=dev, dtype=dtype, generator=g)
        k, v = (torch.randn(1, Tk, Hkv, D, device=dev, dtype=dtype, generator=g) for _ in range(2))
        # offsets on the host: reading them costs no device sync
        cu_q = torch.arange(N + 1, dtype=torch.int32) if N > 1 else None
        cu_k = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32) if N > 1 else None
        if N == 1:
            qd, kd, vd, mask = q, k, v, None
        else:   # dense: the caches right-aligned in a padded batch [N, longest] with a key padding mask
            L = max(lens)
            kd = torch.zeros(N, L, Hkv, D, device=dev, dtype=dtype)
            vd = torch.zeros_like(kd)
            mask = torch.zeros(N, 1, 1, L, dtype=torch.bool, device=dev)
            for i, n in enumerate(lens):
                kd[i, L - n:] = k[0, int(cu_k[i]):int(cu_k[i + 1])]
                vd[i, L - n:] = v[0, int(cu_k[i]):int(cu_k[i + 1])]
                mask[i, ..., L - n:] = True
            qd = q[0][:, None]
        kv_bytes = Hkv * 2 * D * k.element_size()                # one key and value row of all kv heads
        dense = {}
        for name, sb in self.dense_names(c).items():
            self.say(f"  {c.name}: dense ({name}) ...")
            dense.update(self.timed(name, lambda sb=sb: sdpa(qd, kd, vd, sb, causal=False, mask=mask), False))
            dense[f"{name}_gbps"] = Tk * kv_bytes / dense[f"{name}_ms"] / 1e6
        ref = None
        if all(-(-n // c.block_size) <= c.topk for n in lens):   # every block chosen: MoBA equals dense attention
            ref = sdpa(qd, kd, vd, causal=False, mask=mask).reshape(1, N, H, D)
        rows = []
        for req, be in self.backends(c, dtype):
            # the means cache as generation leaves it; the timed steps complete no new block
            cache = moba.BlockMeansCache()
            cache.means(k[0], c.block_size, cu_k)
            kw = dict(cu_seqlens=cu_q, cu_seqlens_k=cu_k, backend=be)

            def run_step(cache=cache, kw=kw):
                with torch.no_grad():
                    return moba.moba_attention(q, k, v, c.block_size, c.topk, means_cache=cache, **kw)

            def no_cache(kw=kw):          # every cached key re-pooled at every step
                with torch.no_grad():
                    return moba.moba_attention(q, k, v, c.block_size, c.topk, **kw)

            self.say(f"  {c.name}: moba ({be}) ...")
            row = dict(T=Tk, lengths=lens, timing=self.timing(False), backend=be, backend_requested=req, **dense,
                       **self.timed("moba", run_step, False))
            row["moba_gbps"] = decode_min_keys(c) * kv_bytes / row["moba_ms"] / 1e6
            row["moba_nocache_ms"] = time_ms(no_cache, dev, self.a.repeats)
            if ref is not None:
                row["err_vs_dense"] = _err(run_step(), ref)
            if self.a.profile and self.cuda:
                row.update(profile_call(run_step))
            rows.append(row)
        return rows

    def run_case(self, c: Case, dtype, meta) -> list:
        self.say(f"{c.name}: {c.mode}, " + (f"caches {c.cache_lengths}" if c.decode else f"B={c.batch} T={c.T}")
                 + f", H={c.heads}/{c.kv_heads} D={c.head_dim}, block {c.block_size}, topk {c.topk}")
        try:
            rows = (self.decode_case if c.decode else self.attention_case)(c, dtype)
        finally:
            if self.cuda:
                torch.cuda.empty_cache()
        out = []
        for r in rows:
            names = [n for n in dense_variants(self.device, c.decode) if f"{n}_ms" in r]
            ok = {n: r[f"{n}_ms"] for n in names if not math.isnan(r[f"{n}_ms"])}
            best = min(ok, key=ok.get) if ok else None
            res = dict(case=c.name, family=c.family, mode=c.mode, **meta, batch=c.batch, heads=c.heads,
                       kv_heads=c.kv_heads, head_dim=c.head_dim, block_size=c.block_size, topk=c.topk, **r)
            res.update(dense_best=best, dense_ms=ok[best] if best else float("nan"),
                       dense_peak_bytes=r[f"{best}_peak_bytes"] if best else float("nan"))
            res["speedup"] = res["dense_ms"] / r["moba_ms"]
            for n in names:
                res[f"speedup_{n}"] = r[f"{n}_ms"] / r["moba_ms"]
            if "moba_graph_ms" in r:
                g = {n: r[f"{n}_graph_ms"] for n in names if not math.isnan(r.get(f"{n}_graph_ms", math.nan))}
                res["dense_graph_ms"] = min(g.values()) if g else float("nan")
                res["speedup_graph"] = res["dense_graph_ms"] / r["moba_graph_ms"]
            out.append(res)
        return out


def _f(x, fmt):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def format_table(rows) -> str:
    """One markdown table per family, the columns those rows have."""
    out = []
    for fam in dict.fromkeys(r["family"] for r in rows):
        rs = [r for r in rows if r["family"] == fam]
        dense = list(dict.fromkeys(k[len("speedup_"):] for r in rs for k in r
                                   if k.startswith("speedup_") and k != "speedup_graph"))
        cols = [("case", lambda r: r["case"]), ("pass", lambda r: r["mode"])]
        if fam == "decode":
            cols.append(("cached tokens", lambda r: "+".join(map(str, r["lengths"])) if len(r["lengths"]) <= 4
                         else f"{len(r['lengths'])} caches, {r['T']}"))
        else:
            cols += [("B x T", lambda r: f"{r['batch']} x {r['T']}"), ("pairs read", lambda r: f"{100 * r['frac_pairs']:.1f}%")]
        cols += [("H/Hkv x D", lambda r: f"{r['heads']}/{r['kv_heads']} x {r['head_dim']}"),
                 ("block/topk", lambda r: f"{r['block_size']}/{r['topk']}"), ("backend", lambda r: r["backend"])]
        cols += [(f"{n} ms", lambda r, n=n: _f(r.get(f"{n}_ms"), ".3f")) for n in dense]
        cols += [("moba ms", lambda r: _f(r["moba_ms"], ".3f")), ("speedup", lambda r: _f(r["speedup"], ".2f") + "x")]
        if fam == "decode":
            cols += [("GB/s dense / moba (min)", lambda r: _f(r.get(f"{r['dense_best']}_gbps"), ".3g") + " / "
                      + _f(r["moba_gbps"], ".3g")),
                     ("moba ms, no means cache", lambda r: _f(r["moba_nocache_ms"], ".3f"))]
        else:
            cols.append(("TFLOP/s dense / moba", lambda r: _f(r.get(f"{r['dense_best']}_tflops"), ".3g") + " / "
                         + _f(r["moba_tflops"], ".3g")))
        cols.append(("peak MiB dense / moba", lambda r: _f(r["dense_peak_bytes"] / 2**20, ".1f") + " / "
                     + _f(r["moba_peak_bytes"] / 2**20, ".1f")))
        if any("gate_ms" in r for r in rs):
            cols.append(("gate ms", lambda r: _f(r.get("gate_ms"), ".3f")))
        if any("err_vs_dense" in r for r in rs):
            cols.append(("max err vs dense", lambda r: _f(r.get("err_vs_dense"), ".1e")))
        if any("moba_graph_ms" in r for r in rs):
            cols += [(f"{n} graph ms", lambda r, n=n: _f(r.get(f"{n}_graph_ms"), ".3f")) for n in dense]
            cols += [("moba graph ms", lambda r: _f(r.get("moba_graph_ms"), ".3f")),
                     ("speedup (graphs)", lambda r: _f(r.get("speedup_graph"), ".2f") + "x")]
        if any("host_ms" in r for r in rs):
            cols += [("host ms", lambda r: _f(r.get("host_ms"), ".3f")),
                     ("GPU kernels ms", lambda r: _f(r.get("gpu_kernel_ms"), ".3f"))]
        out += [" | ".join(h for h, _ in cols), " | ".join("---" for _ in cols)]
        out += [" | ".join(f(r) for _, f in cols) for r in rs]
        out.append("")
    return "\n".join(out).rstrip("\n")


def list_cases() -> str:
    lines = ["case | pass | shape | block/topk | note", "--- | --- | --- | --- | ---"]
    for c in CASES.values():
        shape = (f"caches {'+'.join(map(str, c.cache_lengths))}" if c.decode else f"{c.batch} x {c.T}")
        lines.append(f"{c.name} | {c.mode} | {shape}, {c.heads}/{c.kv_heads} heads, D {c.head_dim} | "
                     f"{c.block_size}/{c.topk} | {c.about}")
    lines += ["", "groups: " + "; ".join(f"{g} = {','.join(v)}" for g, v in GROUPS.items())]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=None, help="comma-separated case or group names (default fwd8k,fb32k; "
                                                 "--list shows them)")
    p.add_argument("--smoke", action="store_true", help="the tiny cases (group 'smoke'), on any device")
    p.add_argument("--list", action="store_true", help="print the cases and groups, run nothing")
    p.add_argument("--backend", default="auto",
                   help="MoBA backends, comma-separated: auto, triton, gluon, torch, naive (one row each)")
    p.add_argument("--dense", default=None,
                   help="dense baselines to time, comma-separated, '' for none (default: cudnn,flash on CUDA; for "
                        "decode steps also sdpa (PyTorch's choice) and efficient; sdpa on the CPU)")
    p.add_argument("--flash-max", type=int, default=128 * K,
                   help="time the flash baseline up to this T (it trails cuDNN, and at 1M it costs minutes)")
    p.add_argument("--graph", action="store_true",
                   help="CUDA: also time each call replayed from a CUDA graph (calls under 256K tokens)")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: MoBA's host time per call and GPU kernels (moba.bench.profile_call; calls under 256K)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls of long cases and on the CPU (median); do_bench runs max(100, 50 x repeats) ms")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="append the JSON lines here instead of benchmarks/results/<family>.jsonl")
    p.add_argument("--no-record", action="store_true", help="print the table only")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.list:
        print(list_cases())
        return 0
    names = expand(a.cases if a.cases is not None else ("smoke" if a.smoke else "fwd8k,fb32k"))
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = a.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = DTYPES[dtype_name]
    meta = dict(commit=source_commit(), card=card(device), device=device.type, **versions(), dtype=dtype_name,
                graph=bool(a.graph and device.type == "cuda"), repeats=a.repeats,
                command=shlex.join(["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]),
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    print(f"# {meta['card']}, torch {meta['torch']}, triton {meta['triton']}, cuDNN {meta['cudnn_version']}; {dtype_name}; "
          f"commit {meta['commit']}; backends {a.backend}; {'eager and CUDA graphs' if meta['graph'] else 'eager'}",
          flush=True)
    runner, rows, failed = Runner(a, device), [], []
    for n in names:
        c = CASES[n]
        try:
            got = runner.run_case(c, dtype, meta)
        except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as e:
            runner.say(f"{n} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            failed.append(n)
            continue
        rows += got
        if not a.no_record and (a.out or not c.smoke):     # as each case ends: a later failure loses nothing
            append_jsonl(a.out or RESULTS / f"{c.family}.jsonl", got)
    if rows:
        print(format_table(rows))
    if not a.no_record and rows:
        dest = a.out or ", ".join(sorted({str(RESULTS / f"{r['family']}.jsonl") for r in rows
                                          if not CASES[r["case"]].smoke})) or "nowhere (smoke cases need --out)"
        print(f"# appended to {dest}")
    if failed:
        print(f"# failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
