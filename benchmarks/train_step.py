"""One training step of the experiments' model (experiments/train.py, preset s32k: 26.75M parameters, 8 layers,
8 query / 2 kv heads of 64, one sequence of 32K tokens) with MoBA against full attention (SDPA): forward under bf16
autocast, loss, backward, gradient clipping and the fused AdamW step, as train.py runs them, on random token ids.
Per attention: median ms per step over --steps timed steps (after --warmup), tokens/s, peak memory.

    python benchmarks/train_step.py [--preset s32k] [--steps 10] [--seq-len N]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--preset", default="s32k")
ap.add_argument("--seq-len", type=int, default=None)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--attn", default="moba,full")
ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_step.jsonl"))
ap.add_argument("--smoke", action="store_true", help="the tiny-cpu preset, two steps (checks this script)")
A = ap.parse_args()
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import torch  # noqa: E402

import train as exp  # noqa: E402  (experiments/train.py)
from moba.bench import append_jsonl, card, source_commit, versions  # noqa: E402

if A.smoke:
    A.preset, A.steps, A.warmup = "tiny-cpu", 2, 1


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = dict(exp.PRESETS[A.preset])
    if A.seq_len:
        base["seq_len"] = A.seq_len
    rows = []
    for attn in A.attn.split(","):
        cfg = exp.Config(**{**base, "attn": attn})
        torch.manual_seed(0)
        model = exp.GPT(cfg).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                                fused=dev.type == "cuda")
        g = torch.Generator(device=dev).manual_seed(1)
        x, y = (torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq_len), device=dev, generator=g) for _ in range(2))

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        for _ in range(A.warmup):
            step()
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for _ in range(A.steps):
            t = time.perf_counter()
            loss = step()
            sync(dev)
            times.append((time.perf_counter() - t) * 1e3)
        ms = statistics.median(times)
        row = dict(case=f"train_{A.preset}", attn=attn, commit=source_commit(), card=card(dev), **versions(),
                   params=sum(p.numel() for p in model.parameters()), seq_len=cfg.seq_len, batch=cfg.batch,
                   layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads, head_dim=cfg.dim // cfg.heads,
                   block_size=cfg.block_size, topk=cfg.topk, step_ms=ms, step_ms_all=times,
                   tokens_per_s=cfg.batch * cfg.seq_len / ms * 1e3, loss=float(loss.detach()),
                   peak_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
                   config=dataclasses.asdict(cfg), command="python " + " ".join(sys.argv))
        rows.append(row)
        print(f"{card(dev)} {A.preset} {attn}: {ms:.2f} ms/step, {row['tokens_per_s']:.0f} tok/s, peak "
              f"{(row['peak_bytes'] or 0) / 2**30:.2f} GiB", flush=True)
        model = opt = step = None       # freed before the next model is built
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if len(rows) == 2:
        rows[0]["speedup_vs_" + rows[1]["attn"]] = rows[1]["step_ms"] / rows[0]["step_ms"]
        print(f"{rows[0]['attn']} over {rows[1]['attn']}: {rows[1]['step_ms'] / rows[0]['step_ms']:.2f}x")
    append_jsonl(A.out, rows)
    print(f"appended to {A.out}")


if __name__ == "__main__":
    main()
