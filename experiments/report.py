"""Tables and plots for experiments/RESULTS.md from experiments/results/{runs,curves}.jsonl.

    python experiments/report.py                      # prints the tables, redraws experiments/results/*.png
    python experiments/report.py --add out/*.json     # appends new result files (train.py's history.json or
                                                      # retrieval.py's retrieval.json, renamed to the run's name)

runs.jsonl holds one line per run: the result file's content without its evaluation history, plus "source" (the
run's name). curves.jsonl holds one line per evaluation of a train.py run: "source" plus that evaluation (step,
val_loss, buckets, trailing_2k[, trailing_2k_short], tokens_seen, wall_s).
"""
from __future__ import annotations

import functools
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent / "results"
RUNS, CURVES = HERE / "runs.jsonl", HERE / "curves.jsonl"


@functools.lru_cache(maxsize=1)
def _all() -> dict:
    runs = {}
    for line in RUNS.read_text().splitlines():
        d = json.loads(line)
        runs[d.pop("source")] = d
    for line in CURVES.read_text().splitlines():
        h = json.loads(line)
        runs[h.pop("source")].setdefault("history", []).append(h)
    return runs


def load(name):
    """A run as its result file held it (train.py runs with their "history")."""
    return _all()[name]


def add(paths):
    """Append result files to runs.jsonl / curves.jsonl under their file names (without .json)."""
    have = set(_all())
    with RUNS.open("a") as runs, CURVES.open("a") as curves:
        for p in map(pathlib.Path, paths):
            if p.stem in have:
                raise SystemExit(f"{p.stem} is already in {RUNS.name}")
            d = json.loads(p.read_text())
            hist = d.pop("history", None)
            runs.write(json.dumps({"source": p.stem, **d}) + "\n")
            for h in hist or []:
                curves.write(json.dumps({"source": p.stem, **h}) + "\n")
            have.add(p.stem)
    _all.cache_clear()


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


def tokens(name):
    return load(name)["history"][-1]["tokens_seen"] / 1e6


def gap_by_position(long8, small, hyb8):
    """MoBA's loss vs full attention's per position bucket (1K each of 8K) at 6000 steps, the mean over seeds; the
    first bucket (positions < 1024: two blocks of 512, which topk 3 always covers) reads exactly the same keys under
    both, so its gap is the runs' difference that has nothing to do with what MoBA leaves out."""
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


def loss_parity():
    """1. Loss parity at 8K: 6000 steps of 4 x 8192 tokens, 26.75M and 4.92M models, three seeds each; the
    2000-step runs before them; blocks of 128 (topk 12) at the same sparsity; the hybrids (4.)."""
    long8 = [f"s8k6k_{a}{s}" for s in ("_h100", "_seed1_h100", "_seed2_h200") for a in ("full", "moba")]
    small = [f"s8k6k_small_{a}{s}_h200" for s in ("", "_seed1", "_seed2") for a in ("full", "moba")]
    hyb8 = ["s8k6k_until90_h100", "s8k6k_last2_h100"]
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
    table([n for row in trio for n in row[1:]] + hyb8, title="26.75M runs (and the hybrids, seed 0)")

    def gap_curve(f, m):
        full = {r["step"]: r["val_loss"] for r in load(f)["history"]}
        rows = [r for r in load(m)["history"] if r["step"] in full]
        return [r["tokens_seen"] / 1e6 for r in rows], [100 * (r["val_loss"] / full[r["step"]] - 1) for r in rows]
    plot("parity_8k_seeds.png", "8K, 26.75M, 6000 steps: MoBA vs full attention, same seed", "tokens seen (M)",
         [(f"{a}, seed {sd}", *gap_curve(f, m if a == "512/3" else g), 3,
           dict(color="C1" if a == "512/3" else "C0", ls=("-", "--", ":")[sd])) for a in ("512/3", "128/12")
          for sd, f, m, g in trio], ylabel="val loss vs full attention (%)", zero_line=True, legend_size=7)

    plot("loss_8k_6000_small.png", "8K, 6000 steps, 4.92M parameters (seeds 0-2)", "tokens seen (M)",
         [curve(n, lambda r: r["tokens_seen"] / 1e6) for n in small])
    table(small, title="4.92M runs")
    for size, names in (("26.75M", long8), ("4.92M", small)):
        pairs = [(final(f)[1]["val_loss"], final(m)[1]["val_loss"]) for f, m in zip(names[::2], names[1::2])]
        per = ", ".join(f"{100 * (m / f - 1):+.1f}%" for f, m in pairs)
        mf, mm = (sum(x) / len(pairs) for x in zip(*pairs))
        print(f"{size}: MoBA vs full per seed {per}; means {mf:.4f} / {mm:.4f} ({100 * (mm / mf - 1):+.2f}%)")
    gap_by_position(long8, small, hyb8)

    plot("hybrid_8k_6000.png", "8K, 6000 steps, seed 0: full, MoBA and the hybrids", "tokens seen (M)",
         [(label, *curve(n, lambda r: r["tokens_seen"] / 1e6)[1:]) for label, n in [
             ("full", "s8k6k_full_h100"), ("MoBA", "s8k6k_moba_h100"),
             ("MoBA, then full for the last 10%", "s8k6k_until90_h100"),
             ("MoBA, last 2 layers full", "s8k6k_last2_h100")]])

    # the 2000-step runs (65M tokens): seed 1's MoBA run was cut by its time guard at 1848, so compared at 1750
    print("\n| seed | card | step | tokens | full | MoBA | MoBA vs full |\n|---|---|---|---|---|---|---|")
    for sd, f, m, step in ((0, "s8k_full_h200", "s8k_moba_h200", None), (1, "s8k_full_seed1_h100",
                           "s8k_moba_seed1_h100", 1750), (2, "s8k_full_seed2_h100", "s8k_moba_seed2_h100", None)):
        (d, hf), hm = final(f, step), final(m, step)[1]
        print(f"| {sd} | {d['device']} | {hf['step']} | {hf['tokens_seen'] / 1e6:.1f}M | {hf['val_loss']:.4f} "
              f"| {hm['val_loss']:.4f} | {100 * (hm['val_loss'] / hf['val_loss'] - 1):+.1f}% |")

    # 3. granularity at 8K: 128/12 against 512/3; two 26.75M runs stopped early (their histories parsed from the
    # logs), so compared at the steps every run reached
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


def context_cost(label, name):
    """The trailing 2K scored with 4K of context against the whole window, at every evaluation."""
    h = load(name)["history"]
    return label, [r["step"] for r in h], [100 * (r["trailing_2k_short"] / r["trailing_2k"] - 1) for r in h], 3


def trailing_32k():
    """2. Trailing tokens at 32K: the 26.75M model (R6) and the 4.92M model (R5) for 6000 steps of 32K tokens, and
    the 4.92M runs again with the short-context score (ctx32k_small_*); the 1800-step runs before them."""
    r6 = [("full attention", "s32k6k_full_h200"), ("MoBA 512/3", "s32k6k_moba_h200"),
          ("MoBA, last layer full", "s32k6k_last1_h200"), ("MoBA, then full for the last 10%", "s32k6k_until90_h200"),
          ("MoBA 128/12", "s32k6k_moba128_h200")]
    plot("position_32k_26m.png", "32K, 26.75M model, 197M tokens: loss by position",
         "position (K tokens), bucket centre", [(label, *by_position(n)[1:]) for label, n in r6[:4]], legend_size=7)
    plot("context_32k_26m.png", "32K, 26.75M model: trailing 2K with only 4K of context", "step (32K tokens each)",
         [context_cost(label, n) for label, n in r6], ylabel="loss change from cutting the context (%)",
         zero_line=True, legend_size=7)
    table([n for _, n in r6], title="32K, 26.75M (last bucket: trailing 4K)")
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

    r5 = ["s32k6k_small_full_h200", "s32k6k_small_moba_h200", "s32k6k_small_last1_h200"]
    table(r5, title="32K, 4.92M")
    hf = final(r5[0])[1]
    for n in r5:
        h = final(n)[1]
        print(f"{n}: trailing 2K {h['trailing_2k']:.4f} ({100 * (h['trailing_2k'] / hf['trailing_2k'] - 1):+.2f}% vs "
              f"full), val {100 * (h['val_loss'] / hf['val_loss'] - 1):+.2f}%")
    ctx = [("full attention", "ctx32k_small_full_h200"), ("MoBA 512/3", "ctx32k_small_moba_h200")]
    plot("context_32k_small.png", "32K, 4.92M model: trailing 2K with only 4K of context", "step (32K tokens each)",
         [context_cost(label, n) for label, n in ctx], ylabel="loss change from cutting the context (%)",
         zero_line=True)
    table([n for _, n in ctx], title="32K, 4.92M, short-context score (cut by a time limit)")
    for label, n in ctx:
        c = context_cost(label, n)[2]
        print(f"{label}: cost of cutting the context {min(c):+.2f}% .. {max(c):+.2f}% over {len(c)} evaluations, "
              f"last {c[-1]:+.2f}%")

    table(["s32k_full", "s32k_moba", "s32k_moba_last2"], title="32K, 1800 steps")
    runsg = ["g32k_4096_2", "g32k_2048_4", "g32k_1024_8", "g32k_512_16"]
    for s in (600, 900):
        table(runsg, step=s, title=f"3. granularity at 32K, 75% sparse, step {s}")


def retrieval():
    """5. Retrieval at 16K: the curriculum chains (stage 1 at 256 tokens, 2 at 2K, 3 at 16K) and the runs before."""
    print("\n| run | attention | tokens | card | commit | seed | steps | tokens seen | mean accuracy | answers scored |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for d in sorted((dict(load(n), name=n) for n in _all() if "mean_accuracy" in load(n)), key=lambda d: d["name"]):
        c = d["cfg"]
        att = c["attn"] + (f" {c['block_size']}/{c['topk']}" if c["attn"] == "moba" else "") + \
            (f", last {c['full_last']} full" if c["attn"] == "moba" and c["full_last"] else "")
        steps = d.get("steps_done", c["steps"])
        print(f"| {d['name']} | {att} | {c['seq_len']} | {d['device']} | {d['commit']} | {c['seed']} | {steps} "
              f"| {steps * c['batch'] * c['seq_len'] / 1e6:.1f}M | {d['mean_accuracy']:.3f} "
              f"| {int(sum(d['answers_per_bucket']))} |")
    heat("retrieval_curriculum.png", [("full", "cur_k16k_full"), ("MoBA, last layer full", "cur_k16k_hybrid"),
                                      ("MoBA (0.9 min)", "cur_k16k_moba"), ("MoBA (4 min)", "cur_l16k_moba"),
                                      ("MoBA 128/12 (3.6 min)", "cur_m16k_moba128"),
                                      ("MoBA-trained 2K, 128/12 (2.5 min)", "cur_o16k_moba128"),
                                      ("needles x8: full", "cur_q16k_full"),
                                      ("needles x8: MoBA-trained 2K, 128/12", "cur_p16k_moba128"),
                                      ("MoBA-trained 2K, 32/48 (U)", "cur_u16k_moba32")])
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


def group_gate():
    """6. The gate="group" variant against per-head MoBA (and full attention) on the CPU: gate_cpu_<gate>_s<seed>."""
    names = [f"gate_cpu_{g}_s{s}" for s in range(5) for g in ("head", "group")] + ["gate_cpu_full_s0"]
    names = [n for n in names if n in _all()]
    table(names, title="6. gate='group' against per-head MoBA (CPU, 2 layers, 8 / 2 heads, 1024 tokens, block 64 topk 3)")
    print("\n| seed | per-head MoBA | group gate | group / head - 1 |\n|---|---|---|---|")
    series = []
    for s in range(5):
        pair = [f"gate_cpu_{g}_s{s}" for g in ("head", "group")]
        if all(n in _all() for n in pair):
            h, g = (load(n)["history"] for n in pair)
            print(f"| {s} | {h[-1]['val_loss']:.4f} | {g[-1]['val_loss']:.4f} | "
                  f"{100 * (g[-1]['val_loss'] / h[-1]['val_loss'] - 1):+.2f}% |")
            series.append((f"seed {s}", [r["step"] for r in h],
                           [100 * (b["val_loss"] / a["val_loss"] - 1) for a, b in zip(h, g)], 4))
    if series:
        plot("group_gate_cpu.png", "gate='group' against per-head MoBA, same seed (CPU)", "step", series,
             ylabel="validation loss, group / head - 1 (%)", zero_line=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--add"]:
        return add(argv[1:])
    loss_parity()
    trailing_32k()
    retrieval()
    group_gate()


if __name__ == "__main__":
    main()
