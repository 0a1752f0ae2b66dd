"""Generation tokens/s of a small Llama-style model (random weights) over a long context: ``moba.hf.generate``
through ``MobaCache`` against dense attention with transformers' static cache, decode steps replayed as CUDA graphs
on both sides (and eagerly).

The context is written into the caches directly (random keys and values: the weights are random too, so a prefill
would leave nothing more telling), so what is timed is the decode step: the model's projections and MLPs at batch B
plus attention over the context. Per case and method: ms per token in the steady state (two runs of different
lengths, the difference in time over the difference in tokens, median of --repeats pairs), tokens/s over the batch,
peak memory of the run, and MoBA's speedup over the fastest dense method in the same mode. Dense methods:
"static_sdpa" (transformers' StaticCache and SDPA as a transformers user runs them: the mask spans the whole static
cache) and "prefix_<kernel>" (SDPA's kernel over exactly the context's keys with no mask: the keys of the tokens
generated since are left out, which makes it a lower bound on a correct dense step).

    python benchmarks/generate.py [--contexts 131072,524288] [--new 48] [--layers 4] [--batch 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--contexts", default="131072,524288", help="context lengths before generating")
ap.add_argument("--new", type=int, default=48, help="extra tokens of the longer run of each pair")
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--block", type=int, default=4096)
ap.add_argument("--topk", type=int, default=12)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--modes", default="graph,eager")
ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "generate.jsonl"))
ap.add_argument("--smoke", action="store_true", help="a tiny model on any device (checks this script)")
A = ap.parse_args()
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

import moba.hf  # noqa: E402
from moba import cache_key_sums  # noqa: E402
from moba.bench import append_jsonl, card, cuda_graph, dense_variants, source_commit, versions  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.bfloat16 if DEV == "cuda" else torch.float32
SIZE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128)
SHORT = 8                                   # tokens of the shorter run of each pair
if A.smoke:
    SIZE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16)
    A.contexts, A.new, A.layers, A.block, A.topk, A.repeats = "300", 6, 2, 32, 3, 1
CONTEXTS = [int(x) for x in A.contexts.split(",")]
MODES = A.modes.split(",") if DEV == "cuda" else ["eager"]


def build():
    cfg = transformers.LlamaConfig(num_hidden_layers=A.layers, max_position_embeddings=max(CONTEXTS) + 1024,
                                   attn_implementation="sdpa", **SIZE)
    torch.manual_seed(0)
    with torch.device(DEV):
        return transformers.LlamaForCausalLM(cfg).to(DT).eval()


PREFIX = {"len": 0, "backend": None}


def prefix_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA over the first PREFIX["len"] slots of a static cache, no mask (the dense lower bound)."""
    L = PREFIX["len"]
    k, v = key[:, :, :L], value[:, :, :L]
    if PREFIX["backend"] is None:
        o = F.scaled_dot_product_attention(query, k, v, scale=scaling, enable_gqa=True)
    else:
        from torch.nn.attention import sdpa_kernel
        with sdpa_kernel([PREFIX["backend"]]):
            o = F.scaled_dot_product_attention(query, k, v, scale=scaling, enable_gqa=True)
    return o.transpose(1, 2), None


transformers.AttentionInterface.register("moba_bench_prefix", prefix_attention)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def moba_cache(model, L, Tmax):
    """A MobaCache holding L random tokens per row (keys, values, key sums, lengths)."""
    cache = moba.hf.MobaCache(model, A.batch, Tmax)
    cfg = model.config
    g = torch.Generator(DEV).manual_seed(1)
    kd = torch.empty(A.batch, cfg.num_key_value_heads, 1, cfg.head_dim, dtype=DT, device=DEV)
    for st in cache.layers:
        st.lazy_initialization(kd, kd)
        st.keys[:, :L].normal_(generator=g)
        st.values[:, :L].normal_(generator=g)
        st.sums.copy_(cache_key_sums(st.keys, A.block, cache_seqlens=torch.full((A.batch,), L, device=DEV)))
        st.lens.fill_(L)
    cache.seen = [L] * A.batch
    return cache


@torch.no_grad()
def moba_run(model, cache, L, graph, n):
    """One generate of n tokens from context L (the cache rewound to L first); seconds."""
    j = L // A.block
    for st in cache.layers:       # rewind: lengths, and the sums of the blocks the last run appended to
        st.lens.fill_(L)
        st.sums[:, j:].copy_(cache_key_sums(st.keys[:, j * A.block:], A.block,
                                            cache_seqlens=torch.full((A.batch,), L - j * A.block, device=DEV))
                             [:, :st.sums.shape[1] - j])
    cache.seen = [L] * A.batch
    tok = torch.full((A.batch, 1), 7, dtype=torch.long, device=DEV)
    sync()
    t = time.perf_counter()
    out = moba.hf.generate(model, tok, n, cache=cache, cuda_graph=graph)
    sync()
    return time.perf_counter() - t, out


def static_cache(model, L, Tmax):
    cache = transformers.StaticCache(config=model.config, max_cache_len=Tmax)
    cfg = model.config
    g = torch.Generator(DEV).manual_seed(1)
    kd = torch.empty(A.batch, cfg.num_key_value_heads, 1, cfg.head_dim, dtype=DT, device=DEV)
    for layer in cache.layers:
        layer.lazy_initialization(kd, kd)
        layer.keys[:, :, :L].normal_(generator=g)
        layer.values[:, :, :L].normal_(generator=g)
    return cache


@torch.no_grad()      # as generation runs (with autograd on, the cache's in-place writes would chain every step)
def dense_run(model, cache, L, graph, n):
    """n greedy tokens through transformers' static cache from context L, steps captured or eager; seconds."""
    for layer in cache.layers:
        layer.cumulative_length.fill_(L)
    tok = torch.full((A.batch, 1), 7, dtype=torch.long, device=DEV)
    lens = cache.layers[0].cumulative_length
    out = torch.empty(A.batch, n, dtype=torch.long, device=DEV)

    def step():
        pos = lens.view(1, 1).expand(A.batch, 1).clone()
        logits = model(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
        tok.copy_(logits.argmax(-1)[:, None])

    sync()
    t = time.perf_counter()
    if not graph or n < 3:
        for i in range(n):
            step()
            out[:, i] = tok[:, 0]
    else:   # as moba.hf.generate does: two eager steps off the capture stream, one captured, then replays
        replay, _ = cuda_graph(step, warmup=2)
        for i in range(2, n):
            replay()
            out[:, i] = tok[:, 0]
    sync()
    return time.perf_counter() - t, out


def per_token(run, *args):
    """Steady-state ms per token: median over repeats of (t(SHORT + new) - t(SHORT)) / new; and the peak."""
    run(*args, SHORT)                                               # compile, capture paths, allocator
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    diffs = []
    for _ in range(A.repeats):
        t1, _ = run(*args, SHORT)
        t2, _ = run(*args, SHORT + A.new)
        diffs.append((t2 - t1) / A.new * 1e3)
    peak = torch.cuda.max_memory_allocated() if DEV == "cuda" else None
    return statistics.median(diffs), peak


def main():
    model = build()
    base = dict(commit=source_commit(), card=card(DEV), **versions(), dtype=str(DT).replace("torch.", ""),
                batch=A.batch, layers=A.layers, block_size=A.block, topk=A.topk,
                heads=SIZE["num_attention_heads"], kv_heads=SIZE["num_key_value_heads"], head_dim=SIZE["head_dim"],
                hidden=SIZE["hidden_size"], new_tokens=A.new, command="python " + " ".join(sys.argv))
    print(f"# {base['card']}, {base['commit']}, {base['dtype']}, {A.layers} layers, hidden {SIZE['hidden_size']}, "
          f"{SIZE['num_attention_heads']}/{SIZE['num_key_value_heads']} heads, block {A.block} topk {A.topk}, "
          f"batch {A.batch}")
    for L in CONTEXTS:
        Tmax = L + SHORT + A.new + 2
        for mode in MODES:
            graph = mode == "graph"
            row = dict(base, case=f"ctx{L}", context=L, mode=mode)
            moba.hf.enable(model, block_size=A.block, topk=A.topk)
            cache = moba_cache(model, L, Tmax)
            if graph:   # the captured steps' tokens are the eager steps'
                row["graph_tokens_equal_eager"] = bool(torch.equal(moba_run(model, cache, L, True, SHORT)[1],
                                                                   moba_run(model, cache, L, False, SHORT)[1]))
            row["moba_ms"], row["moba_peak_bytes"] = per_token(moba_run, model, cache, L, graph)
            del cache
            moba.hf.disable(model)
            torch.cuda.empty_cache() if DEV == "cuda" else None
            cache = static_cache(model, L, Tmax)
            dense = {"static_sdpa": ("sdpa", None)}
            for name, be in dense_variants(DEV, decode=True).items():
                dense[f"prefix_{name}"] = ("moba_bench_prefix", be)
            for name, (impl, be) in dense.items():
                model.set_attn_implementation(impl)
                PREFIX.update(len=L, backend=be)
                try:
                    row[f"{name}_ms"], row[f"{name}_peak_bytes"] = per_token(dense_run, model, cache, L, graph)
                except Exception as e:      # a kernel that does not take these shapes: recorded, not fatal
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            model.set_attn_implementation("sdpa")
            del cache
            torch.cuda.empty_cache() if DEV == "cuda" else None
            times = {k[:-3]: v for k, v in row.items() if k.endswith("_ms") and k != "moba_ms"}
            best = min(times, key=times.get)
            row.update(dense_best=best, speedup=times[best] / row["moba_ms"],
                       speedup_static=row.get("static_sdpa_ms", float("nan")) / row["moba_ms"],
                       moba_tokens_per_s=A.batch * 1e3 / row["moba_ms"],
                       dense_tokens_per_s=A.batch * 1e3 / times[best])
            print(f"ctx {L} {mode}: moba {row['moba_ms']:.3f} ms/token ({row['moba_tokens_per_s']:.0f} tok/s), "
                  f"best dense {best} {times[best]:.3f} ({row['speedup']:.2f}x), static_sdpa "
                  f"{row.get('static_sdpa_ms', float('nan')):.3f} ({row['speedup_static']:.2f}x)"
                  + ("" if not graph else f", graph tokens = eager: {row['graph_tokens_equal_eager']}"), flush=True)
            append_jsonl(A.out, [row])
    print(f"appended to {A.out}")


if __name__ == "__main__":
    main()
