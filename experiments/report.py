"""Plots and markdown tables for experiments/RESULTS.md from the result files in experiments/results/.

    python experiments/report.py            # writes experiments/results/*.png, prints the tables
"""
from __future__ import annotations

import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent / "results"


def load(name):
    return json.loads((HERE / f"{name}.json").read_text())


def final(name, step=None):
    d = load(name)
    rows = [h for h in d["history"] if step is None or h["step"] == step]
    return d, (rows[-1] if rows else None)


def table(names, step=None, title=""):
    print(f"\n{title}\n| run | card | commit | seed | steps | tokens seen | wall s | val loss | last bucket |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for n in names:
        d, h = final(n, step)
        if h is None:
            continue
        print(f"| {n} | {d['device']} | {d['commit']} | {d['cfg']['seed']} | {h['step']} | {h['tokens_seen'] / 1e6:.1f}M "
              f"| {h['wall_s']:.0f} | {h['val_loss']:.4f} | {h['buckets'][-1]:.4f} |")


def plot(fname, title, xlabel, series, ylabel="validation loss", zero_line=False, legend_size=None):
    """One line chart (validation loss unless told): series is [(label, xs, ys, marker size[, line style dict])]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, xs, ys, ms, *style in series:
        ax.plot(xs, ys, marker="o", ms=ms, label=label, **(style[0] if style else {}))
    if zero_line:
        ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(HERE / fname, dpi=120)
    plt.close(fig)


def curve(name, x):
    h = load(name)["history"]
    return name, [x(r) for r in h], [r["val_loss"] for r in h], 3


def by_position(name):
    d, h = final(name)
    L, nb = d["cfg"]["seq_len"], len(h["buckets"])
    return name, [(i + 0.5) * L / nb / 1024 for i in range(nb)], h["buckets"], 6


def gap_by_position(long8, small, hyb8):
    """MoBA's loss vs full attention's per position bucket (1K each of 8K) at 6000 steps, seed by seed and the mean;
    the first bucket (positions < 1024: two blocks of 512, which topk 3 always covers) reads exactly the same keys
    under both, so its gap is the runs' difference that has nothing to do with what MoBA leaves out."""
    def gaps(pairs):
        rows = []
        for f, m in pairs:
            bf, bm = final(f)[1]["buckets"], final(m)[1]["buckets"]
            rows.append([100 * (y / x - 1) for x, y in zip(bf, bm)])
        return rows, [sum(c) / len(c) for c in zip(*rows)]

    print("\n| model | pairs | " + " | ".join(f"{i}-{i + 1}K" for i in range(8)) + " |\n|---|---|"
          + "---|" * 8)
    series = []
    for label, pairs in ((f"26.75M, MoBA ({len(long8) // 2} seeds)", list(zip(long8[::2], long8[1::2]))),
                         (f"4.92M, MoBA ({len(small) // 2} seeds)", list(zip(small[::2], small[1::2]))),
                         ("26.75M, MoBA then full 10%", [(long8[0], hyb8[0])]),
                         ("26.75M, last 2 layers full", [(long8[0], hyb8[1])])):
        rows, mean = gaps(pairs)
        print(f"| {label} | {len(rows)} | " + " | ".join(f"{g:+.2f}%" for g in mean) + " |")
        series.append((label, [i + 0.5 for i in range(8)], mean, 4))
    plot("gap_by_position_8k.png", "8K, 6000 steps: gap to full attention by position",
         "position (K tokens), bucket centre", series, ylabel="loss vs full attention (%)", zero_line=True,
         legend_size=7)


def main():
    # 1. loss parity at 8K
    runs8 = ["s8k_full_h200", "s8k_moba_h200", "s8k_full_h100", "s8k_moba_then_full_h100"]   # the last: 4. hybrid
    plot("loss_8k.png", "8K context, block 512, topk 3", "tokens seen (M)",
         [curve(n, lambda r: r["tokens_seen"] / 1e6)
          for n in runs8 + [f"s8k_{a}_seed{s}_h100" for s in (1, 2) for a in ("full", "moba")]])
    table(runs8, title="8K")
    seeds = ["s8k_full_seed1_h100", "s8k_moba_seed1_h100"]   # the MoBA run was cut by its time guard at 1848
    table(seeds, step=1750, title="8K, seed 1, compared at step 1750")
    table(["s8k_full_seed2_h100", "s8k_moba_seed2_h100"], title="8K, seed 2")
    # the same at 3x the tokens (6000 steps, gpu_runs.sh R), seeds 0 and 1 (H100), seed 2 (H200)
    long8 = [f"s8k6k_{a}{s}" for s in ("_h100", "_seed1_h100", "_seed2_h200") for a in ("full", "moba")]
    hyb8 = ["s8k6k_until90_h100", "s8k6k_last2_h100"]     # 4. the hybrids at this scale (gpu_runs.sh R2), seed 0
    plot("loss_8k_6000.png", "8K context, block 512, topk 3, 6000 steps (seeds 0-2)", "tokens seen (M)",
         [curve(n, lambda r: r["tokens_seen"] / 1e6) for n in long8])
    plot("hybrid_8k_6000.png", "8K, 6000 steps, seed 0: full, MoBA and the hybrids", "tokens seen (M)",
         [(label, *curve(n, lambda r: r["tokens_seen"] / 1e6)[1:]) for label, n in [
             ("full", "s8k6k_full_h100"), ("MoBA", "s8k6k_moba_h100"),
             ("MoBA, then full for the last 10%", "s8k6k_until90_h100"),
             ("MoBA, last 2 layers full", "s8k6k_last2_h100")]])
    table(long8 + hyb8, title="8K, 6000 steps")
    # a second, smaller model size (dim 256, 4 layers, 4.92M parameters) at the same tokens, seeds 0-2 (R3, H200)
    small = [f"s8k6k_small_{a}{s}_h200" for s in ("", "_seed1", "_seed2") for a in ("full", "moba")]
    plot("loss_8k_6000_small.png", "8K, 6000 steps, 4.92M parameters (seeds 0-2)", "tokens seen (M)",
         [curve(n, lambda r: r["tokens_seen"] / 1e6) for n in small])
    table(small, title="8K, 6000 steps, 4.92M parameters")
    gap_by_position(long8, small, hyb8)
    for size, names in (("26.75M", long8), ("4.92M", small)):
        pairs = [(final(f)[1]["val_loss"], final(m)[1]["val_loss"]) for f, m in zip(names[::2], names[1::2])]
        gaps = ", ".join(f"{100 * (m / f - 1):+.1f}%" for f, m in pairs)
        mf, mm = (sum(x) / len(pairs) for x in zip(*pairs))
        print(f"{size}: MoBA vs full per seed {gaps}; means {mf:.4f} / {mm:.4f} ({100 * (mm / mf - 1):+.2f}%)")

    # 3. granularity at 8K (R4): blocks of 128 / topk 12 against 512 / topk 3; two 26.75M runs stopped early (their
    # histories parsed from the logs), so compared at the steps they reached; the third ran to the end
    gran = [("26.75M full", "s8k6k_full_h100"), ("26.75M MoBA 512/3", "s8k6k_moba_h100"),
            ("26.75M MoBA 128/12", "s8k6k_moba128_h200"), ("26.75M MoBA 128/12, again", "s8k6k_moba128_rerun_h200"),
            ("26.75M MoBA 128/12, third run", "s8k6k_moba128_end_h200"),
            ("4.92M full", "s8k6k_small_full_h200"), ("4.92M MoBA 512/3", "s8k6k_small_moba_h200"),
            ("4.92M MoBA 128/12", "s8k6k_small_moba128_h200"),
            ("4.92M MoBA 128/12, again", "s8k6k_small_moba128_rerun_h200")]
    plot("granularity_8k.png", "8K, 6000 steps planned, seed 0: block/topk at equal keys", "tokens seen (M)",
         [(label, *curve(n, lambda r: r["tokens_seen"] / 1e6)[1:]) for label, n in gran], legend_size=7)
    print("\n| run | step 2000 | step 3250 | step 6000 |\n|---|---|---|---|")
    for label, n in gran:
        cells = [final(n, st)[1] for st in (2000, 3250, 6000)]
        print(f"| {label} | " + " | ".join(f"{h['val_loss']:.4f}" if h else "-" for h in cells) + " |")

    # 1./3. at 26.75M, three seeds: MoBA 128/12 (the same 1536 keys per query as 512/3, finer blocks) against full
    # attention and 512/3 (seed 0: the run to the end; seeds 1 and 2: gpu_runs.sh R4 with SEED, seventeenth session)
    trio = [(0, "s8k6k_full_h100", "s8k6k_moba_h100", "s8k6k_moba128_end_h200"),
            (1, "s8k6k_full_seed1_h100", "s8k6k_moba_seed1_h100", "s8k6k_moba128_seed1_h200"),
            (2, "s8k6k_full_seed2_h200", "s8k6k_moba_seed2_h200", "s8k6k_moba128_seed2_h200")]
    print("\n| seed | full | MoBA 512/3 | vs full | MoBA 128/12 | vs full | 128/12 vs 512/3 | wall s (full / 512/3 / "
          "128/12) |\n|---|---|---|---|---|---|---|---|")
    gaps = {"512/3": [], "128/12": []}
    for sd, f, m, g in trio:
        hf, hm, hg = (final(n)[1] for n in (f, m, g))
        lf, lm, lg = hf["val_loss"], hm["val_loss"], hg["val_loss"]
        gaps["512/3"].append(100 * (lm / lf - 1))
        gaps["128/12"].append(100 * (lg / lf - 1))
        print(f"| {sd} | {lf:.4f} | {lm:.4f} | {gaps['512/3'][-1]:+.2f}% | {lg:.4f} | {gaps['128/12'][-1]:+.2f}% "
              f"| {100 * (lg / lm - 1):+.2f}% | {hf['wall_s']:.0f} / {hm['wall_s']:.0f} / {hg['wall_s']:.0f} |")
    print("| mean | | | " + " | | ".join(f"{sum(v) / len(v):+.2f}%" for v in gaps.values()) + " | | |")
    table([n for row in trio for n in row[1:]], title="the runs of that table")

    def gap_curve(f, m):
        full = {r["step"]: r["val_loss"] for r in load(f)["history"]}
        rows = [r for r in load(m)["history"] if r["step"] in full]
        return [r["tokens_seen"] / 1e6 for r in rows], [100 * (r["val_loss"] / full[r["step"]] - 1) for r in rows]
    plot("parity_8k_seeds.png", "8K, 26.75M, 6000 steps: MoBA vs full attention, same seed", "tokens seen (M)",
         [(f"{a}, seed {sd}", *gap_curve(f, m if a == "512/3" else g), 3,
           dict(color="C1" if a == "512/3" else "C0", ls=("-", "--", ":")[sd])) for a in ("512/3", "128/12")
          for sd, f, m, g in trio], ylabel="val loss vs full attention (%)", zero_line=True, legend_size=7)

    # 2. position-wise loss at 32K
    runs32 = ["s32k_full", "s32k_moba", "s32k_moba_last2"]
    plot("position_32k.png", "32K context, block 512, topk 3: loss by position (step 1800)",
         "position (K tokens), bucket centre", [by_position(n) for n in runs32])
    table(runs32, title="32K")
    # 2. again with R3's 4.92M model for 197M tokens (gpu_runs.sh R5: s32k6k_small_<full|moba|last1>[_<card>]),
    # once its results are in
    runs32s = sorted(f.stem for f in HERE.glob("s32k6k_small_*.json"))
    if runs32s:
        plot("position_32k_small.png", "32K context, 4.92M model, block 512, topk 3: loss by position",
             "position (K tokens), bucket centre", [by_position(n) for n in runs32s])
        table(runs32s, title="32K, 4.92M model")
        print("trailing 2K tokens: " + ", ".join(f"{n} {final(n)[1].get('trailing_2k', float('nan')):.4f}"
                                                 + (f" (short context {final(n)[1]['trailing_2k_short']:.4f})"
                                                    if "trailing_2k_short" in final(n)[1] else "")
                                                 for n in runs32s))
        full32 = next((n for n in runs32s if "_full" in n), None)
        print("\n| vs full | " + " | ".join(f"{4 * i}-{4 * i + 4}K" for i in range(8)) + " | last 2K |\n|---|"
              + "---|" * 9)
        for n in runs32s:
            if full32 and n != full32:
                (bf, tf), (bm, tm) = ((final(x)[1]["buckets"], final(x)[1]["trailing_2k"]) for x in (full32, n))
                print(f"| {n} | " + " | ".join(f"{100 * (y / x - 1):+.2f}%" for x, y in zip(bf, bm))
                      + f" | {100 * (tm / tf - 1):+.2f}% |")

    # 2. again: what the context beyond 4K is worth (the trailing 2K scored with only 4K of context), R5's full and
    # MoBA runs again alone (ctx32k_small_<attn>_h200)
    ctx = [("full attention", "ctx32k_small_full_h200"), ("MoBA 512/3", "ctx32k_small_moba_h200")]
    if all((HERE / f"{n}.json").exists() for _, n in ctx):
        plot("context_32k_small.png", "32K, 4.92M model: trailing 2K with only 4K of context",
             "step (32K tokens each)",
             [(label, [r["step"] for r in load(n)["history"]],
               [100 * (r["trailing_2k_short"] / r["trailing_2k"] - 1) for r in load(n)["history"]], 3)
              for label, n in ctx], ylabel="loss change from cutting the context (%)", zero_line=True)

    # 2. again with the 26.75M model at 32K for 197M tokens (gpu_runs.sh R6, seed 0, one H200 each; 128/12 cut by
    # its time limit at step 4428), the trailing 2K and the same 2K with only 4K of context
    r6 = [("full attention", "s32k6k_full_h200"), ("MoBA 512/3", "s32k6k_moba_h200"),
          ("MoBA, last layer full", "s32k6k_last1_h200"), ("MoBA, then full for the last 10%", "s32k6k_until90_h200"),
          ("MoBA 128/12", "s32k6k_moba128_h200")]
    if all((HERE / f"{n}.json").exists() for _, n in r6):
        plot("position_32k_26m.png", "32K, 26.75M model, 197M tokens: loss by position",
             "position (K tokens), bucket centre", [(label, *by_position(n)[1:]) for label, n in r6[:4]],
             legend_size=7)
        plot("context_32k_26m.png", "32K, 26.75M model: trailing 2K with only 4K of context", "step (32K tokens each)",
             [(label, [r["step"] for r in load(n)["history"]],
               [100 * (r["trailing_2k_short"] / r["trailing_2k"] - 1) for r in load(n)["history"]], 3)
              for label, n in r6], ylabel="loss change from cutting the context (%)", zero_line=True, legend_size=7)
        table([n for _, n in r6], title="the runs of R6")
        for step in (4000, 6000):
            _, hf = final(r6[0][1], step)
            print(f"\nstep {step}\n| run | val loss | vs full | last 2K | vs full | last 2K, 4K of context | cost of "
                  "cutting | first / last 4K bucket | wall s |\n|---|---|---|---|---|---|---|---|---|")
            for label, n in r6:
                h = final(n, step)[1]
                if h is None:
                    continue
                print(f"| {label} | {h['val_loss']:.4f} | {100 * (h['val_loss'] / hf['val_loss'] - 1):+.2f}% "
                      f"| {h['trailing_2k']:.4f} | {100 * (h['trailing_2k'] / hf['trailing_2k'] - 1):+.2f}% "
                      f"| {h['trailing_2k_short']:.4f} | {100 * (h['trailing_2k_short'] / h['trailing_2k'] - 1):+.2f}% "
                      f"| {h['buckets'][0]:.3f} / {h['buckets'][-1]:.3f} | {h['wall_s']:.0f} |")

    # 3. granularity at 75% sparsity (equal steps compared: the runs were cut by a time guard at different steps)
    runsg = ["g32k_4096_2", "g32k_2048_4", "g32k_1024_8", "g32k_512_16"]
    plot("granularity_32k.png", "32K, 75% sparse: block/topk", "step (32K tokens each)",
         [curve(n, lambda r: r["step"]) for n in runsg])
    for s in (600, 900):
        table(runsg, step=s, title=f"granularity at step {s}")

    # 5. retrieval: fine-tuned from the 8K model (retrieval_*), and the synthetic task from scratch (synthetic_*)
    print("\n| run | card | commit | steps | accuracy (mean over depth) | answers scored |\n|---|---|---|---|---|---|")
    for n in [f"{t}_{v}" for t in ("retrieval", "synthetic") for v in ("full", "moba", "hybrid")]:
        d = load(n)
        print(f"| {n} | {d['device']} | {d['commit']} | {d.get('steps_done', d['cfg']['steps'])} "
              f"| {d['mean_accuracy']:.3f} | {int(sum(d['answers_per_bucket']))} |")

    # 5. retrieval as a curriculum (gpu_runs.sh K-M): 256 -> 2K with full attention, then 16K; N, O: MoBA
    # already at 2K; P, Q: repeated needles
    cur = ["cur_k256", "cur_k2k", "cur_k16k_full", "cur_k16k_hybrid", "cur_k16k_moba", "cur_l256", "cur_l2k",
           "cur_l16k_moba", "cur_m256", "cur_m2k", "cur_m16k_moba128", "cur_n256", "cur_n2k", "cur_n16k_moba",
           "cur_n16k_moba128", "cur_o256", "cur_o2k", "cur_o16k_moba128",
           # P, Q: needles written 8 times in a row from 2K on; Q (full) starts from P's stage 1
           "cur_p256", "cur_p2k", "cur_p16k_moba128", "cur_q2k", "cur_q16k_full",
           # S, U: blocks of 32 from 2K on (U after the small-block kernel fix: ~9x faster steps)
           "cur_s256", "cur_s2k", "cur_s16k_moba32", "cur_u256", "cur_u2k", "cur_u16k_moba32",
           # V (seed 0) and W (best of seeds 1-4): full and MoBA 32 from one shared stage-1 checkpoint; steps 0:
           # evaluated at 16K without training
           "cur_v0_256", "cur_v0_2k_full", "cur_v0_16k_full", "cur_v0_16k_moba32",
           "cur_w256_seed1", "cur_w256_seed2", "cur_w256_seed3", "cur_w256_seed4", "cur_w2k_full", "cur_w16k_full",
           "cur_w16k_full_lr3e-4", "cur_w16k_full_lr1e-4", "cur_w2k_moba32", "cur_w16k_moba32",
           "cur_w16k_zeroshot_vf2k_full", "cur_w16k_zeroshot_vf2k_moba32", "cur_w16k_zeroshot_vm2k_full",
           "cur_w16k_zeroshot_vm2k_moba32",
           # X: W's MoBA curriculum with seeds 2 and 3, each seed's whole chain, side by side (stage 1 3.5 minutes)
           "cur_x256_2", "cur_x2k_2", "cur_x16k_2", "cur_x256_3", "cur_x2k_3", "cur_x16k_3",
           # X1: stage 1 of seeds 2 and 3 to 24000 steps; X2: MoBA (xm) and full (xf) from seed 2's, seeds 2-4
           "cur_x1_256_2", "cur_x1_256_3"] + [f"cur_x{a}2_{t}_{s}" for s in (2, 3, 4) for a in "mf" for t in ("2k", "16k")]
    print("\n| run | attention | tokens | card | commit | steps | wall s | mean accuracy | answers scored |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for n in cur:
        d = load(n)
        c = d["cfg"]
        att = c["attn"] + (f" {c['block_size']}/{c['topk']}" if c["attn"] == "moba" else "") + \
            (f", last {c['full_last']} full" if c["attn"] == "moba" and c["full_last"] else "")
        print(f"| {n} | {att} | {c['seq_len']} | {d['device']} | {d['commit']} | {d['steps_done']} | {d['wall_s']:.0f} "
              f"| {d['mean_accuracy']:.3f} | {int(sum(d['answers_per_bucket']))} |")
    heat("retrieval_curriculum.png", [("full", "cur_k16k_full"), ("MoBA, last layer full", "cur_k16k_hybrid"),
                                      ("MoBA (0.9 min)", "cur_k16k_moba"), ("MoBA (4 min)", "cur_l16k_moba"),
                                      ("MoBA 128/12 (3.6 min)", "cur_m16k_moba128"),
                                      ("MoBA-trained 2K, 128/12 (2.5 min)", "cur_o16k_moba128"),
                                      ("needles x8: full", "cur_q16k_full"),
                                      ("needles x8: MoBA-trained 2K, 128/12", "cur_p16k_moba128"),
                                      ("MoBA-trained 2K, 32/48 (U)", "cur_u16k_moba32")])
    heat("retrieval_shared_stage1.png", [
        ("full 2K model, full, lr 1e-3", "cur_w16k_full"), ("full 2K model, full, lr 3e-4", "cur_w16k_full_lr3e-4"),
        ("full 2K model, full, lr 1e-4", "cur_w16k_full_lr1e-4"), ("MoBA 2K model, MoBA 32/48", "cur_w16k_moba32"),
        ("full 2K model, full, untrained at 16K", "cur_w16k_zeroshot_vf2k_full"),
        ("MoBA 2K model, full, untrained at 16K", "cur_w16k_zeroshot_vm2k_full"),
        ("MoBA 2K model, MoBA, untrained at 16K", "cur_w16k_zeroshot_vm2k_moba32")])
    # X2: MoBA and its full-attention baseline from one stage-1 checkpoint, three seeds of stages 2-3
    print("\n| seed | full at 16K | MoBA 32/48 at 16K | MoBA / full |\n|---|---|---|---|")
    f, m = ([load(f"cur_x{a}2_16k_{s}")["mean_accuracy"] for s in (2, 3, 4)] for a in "fm")
    for s, a, b in zip((2, 3, 4), f, m):
        print(f"| {s} | {a:.3f} | {b:.3f} | {b / a:.1%} |")
    print(f"| mean | {sum(f) / 3:.3f} | {sum(m) / 3:.3f} | {sum(m) / sum(f):.1%} |")
    heat("retrieval_seeds.png", [(f"seed {s}: {n}", f"cur_x{a}2_16k_{s}") for s in (2, 3, 4)
                                 for a, n in (("f", "full"), ("m", "MoBA 32/48"))])


def heat(fname, rows):
    """Answer accuracy by needle depth, one row per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    acc = [[float("nan") if a is None else a for a in load(n)["accuracy_by_depth"]] for _, n in rows]
    fig, ax = plt.subplots(figsize=(6.5, 0.5 + 0.45 * len(rows)))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, r in enumerate(acc):
        for j, a in enumerate(r):
            ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=7, color="w" if a < 0.5 else "k")
    nb = len(acc[0])
    ax.set_xticks(range(nb), [f"{(j + 0.5) / nb:.2f}" for j in range(nb)])
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.set_xlabel("depth of the queried needle (16K tokens)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(HERE / fname, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
