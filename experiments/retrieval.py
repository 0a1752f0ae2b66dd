"""Long-range retrieval: key-value needles scattered through code, the query at the end.

    python experiments/retrieval.py --preset tiny-cpu --steps 40            # smoke run on the CPU
    python experiments/retrieval.py --preset s8k --attn moba --seq-len 16384 --steps 1500 --out runs/ret_moba

Each sequence is a window of the training corpus with ``--pairs`` needles ``<k> a b <v> c`` inserted at
random depths; it ends with ``<q> a b <v>`` for one of them and the target is its ``c``. Training is
the usual next-token loss plus the answer's loss; evaluation reports answer accuracy by depth of the
queried needle (10 buckets), writes ``retrieval.json`` and, where matplotlib is installed, a heatmap
``retrieval.png`` and ``gate.png`` (which key blocks the gate picks for the final query, per layer and
head, with the needle's block marked).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train as T  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import moba  # noqa: E402


def make_batch(data, cfg, g, pairs, depth=None):
    """Token batch [B, L], targets [B, L], the answer position and value, and the needle's depth."""
    V = cfg.vocab
    K_MARK, V_MARK, Q_MARK = V - 1, V - 2, V - 3
    L = cfg.seq_len
    x = torch.stack([data[s:s + L + 1] for s in torch.randint(0, data.numel() - L - 2, (cfg.batch,), generator=g)])
    x = x.clone()
    ans, depths = [], []
    for b in range(cfg.batch):
        keys = torch.randint(V // 4, V // 2, (pairs, 2), generator=g)
        vals = torch.randint(V // 2, 3 * V // 4, (pairs,), generator=g)
        slots = torch.randperm((L - 8) // 5, generator=g)[:pairs] * 5          # needle starts, no overlap
        target = int(torch.randint(0, pairs, (1,), generator=g))
        if depth is not None:   # put the queried needle at a chosen depth
            slots[target] = int(depth * ((L - 8) // 5 - 1)) * 5
            others = slots[torch.arange(pairs) != target]
            clash = (others - slots[target]).abs() < 5
            slots[torch.nonzero(torch.arange(pairs) != target).flatten()[clash]] = -1
        for i in range(pairs):
            s = int(slots[i])
            if s >= 0:
                x[b, s:s + 5] = torch.tensor([K_MARK, keys[i, 0], keys[i, 1], V_MARK, vals[i]])
        x[b, L - 4:L] = torch.tensor([Q_MARK, keys[target, 0], keys[target, 1], V_MARK])
        x[b, L] = vals[target]
        ans.append(int(vals[target]))
        depths.append(int(slots[target]) / L)
    return x[:, :-1], x[:, 1:], torch.tensor(ans), torch.tensor(depths)


def accuracy_by_depth(model, data, cfg, device, pairs, buckets=10, per_bucket=None):
    model.eval()
    g = torch.Generator().manual_seed(4321)
    acc = []
    with torch.no_grad():
        for i in range(buckets):
            hits = n = 0
            for _ in range(per_bucket or max(1, cfg.eval_batches // 2)):
                x, _, a, _ = make_batch(data, cfg, g, pairs, depth=(i + 0.5) / buckets)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(x.to(device))[:, -1]
                hits += (logits.argmax(-1).cpu() == a).sum().item()
                n += a.numel()
            acc.append(hits / n)
    model.train()
    return acc


def gate_picks(model, data, cfg, device, pairs):
    """Blocks chosen for the final query in every MoBA layer: {layer: int [H, topk]} and the needle's block."""
    g = torch.Generator().manual_seed(99)
    x, _, _, depth = make_batch(data, cfg, g, pairs, depth=0.3)
    captured = {}

    def hook(layer):
        def fn(mod, args):
            xx, cos, sin = args
            B, L, _ = xx.shape
            q = T.rope(mod.q(xx).view(B, L, mod.cfg.heads, mod.hd), cos, sin)
            k = T.rope(mod.kv(xx).view(B, L, 2, mod.cfg.kv_heads, mod.hd).unbind(2)[0], cos, sin)
            captured[layer] = moba.select_blocks(q[:1], k[:1], mod.cfg.block_size, mod.cfg.topk)[0, -1]
        return fn
    hs = [b.attn.register_forward_pre_hook(hook(i)) for i, b in enumerate(model.blocks) if b.attn.mode == "moba"]
    with torch.no_grad():
        model(x[:1].to(device))
    for h in hs:
        h.remove()
    return {i: v.cpu() for i, v in captured.items()}, int(depth[0] * cfg.seq_len) // cfg.block_size


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--answer-weight", type=float, default=1.0)
    p.add_argument("--init", default=None, help="a train.py checkpoint to fine-tune")
    args, rest = p.parse_known_args(argv)
    cfg, _, _ = T.parse(rest)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _, train_data, val_data = T.build_data(cfg)
    model = T.GPT(cfg).to(device)
    if args.init:
        model.load_state_dict(torch.load(args.init, map_location=device, weights_only=False)["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        switched = cfg.moba_until < 1.0 and step >= int(cfg.moba_until * cfg.steps)
        model.set_attention("full" if switched else None)
        for gr in opt.param_groups:
            gr["lr"] = T.lr_at(step, cfg)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        x, y, a, _ = make_batch(train_data, cfg, g, args.pairs)
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        lm = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        answer = F.cross_entropy(logits[:, -1].float(), a.to(device))
        loss = lm + args.answer_weight * answer
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 10 == 0:
            print(f"step {step + 1}/{cfg.steps}  lm {lm.item():.3f}  answer {answer.item():.3f}", flush=True)
    acc = accuracy_by_depth(model, val_data, cfg, device, args.pairs)
    picks, needle_block = gate_picks(model, val_data, cfg, device, args.pairs)
    print("accuracy by depth bucket:", " ".join(f"{x:.2f}" for x in acc))
    res = dict(cfg=dataclasses.asdict(cfg), **T.run_info(device), init=args.init, wall_s=time.perf_counter() - t0,
               pairs=args.pairs, accuracy_by_depth=acc, mean_accuracy=sum(acc) / len(acc),
               gate_picks={str(k): v.tolist() for k, v in picks.items()}, needle_block=needle_block)
    (out / "retrieval.json").write_text(json.dumps(res, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 1.6))
        ax.imshow([acc], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(acc)), [f"{(i + 0.5) / len(acc):.2f}" for i in range(len(acc))])
        ax.set_yticks([])
        ax.set_xlabel("depth of the queried needle")
        ax.set_title(f"answer accuracy, {cfg.attn} attention, {cfg.seq_len} tokens")
        fig.tight_layout()
        fig.savefig(out / "retrieval.png", dpi=120)
        if picks:
            nb = -(-cfg.seq_len // cfg.block_size)
            fig, ax = plt.subplots(figsize=(6, 0.4 + 0.3 * len(picks) * cfg.heads))
            grid = torch.zeros(len(picks) * cfg.heads, nb)
            for r, (_, sel) in enumerate(sorted(picks.items())):
                for h in range(cfg.heads):
                    for b in sel[h].tolist():
                        if b >= 0:
                            grid[r * cfg.heads + h, b] = 1
            ax.imshow(grid.numpy(), cmap="Greys", aspect="auto")
            ax.axvline(needle_block, color="red")
            ax.set_xlabel("key block (red: the queried needle)")
            ax.set_ylabel("layer x head")
            fig.tight_layout()
            fig.savefig(out / "gate.png", dpi=120)
    except ImportError:
        pass
    return res


if __name__ == "__main__":
    main()
