"""Long-range retrieval: key-value needles scattered through code, the query at the end.

    python experiments/retrieval.py --preset tiny-cpu --steps 40            # smoke run on the CPU
    python experiments/retrieval.py --preset s8k --attn moba --seq-len 16384 --steps 1500 --out runs/ret_moba

Each sequence is a window of the training corpus with ``--pairs`` needles ``<k> a b <v> c`` inserted at
random depths; it ends with ``--queries`` queries ``<q> a b <v> c``, each asking for one of them (the
answer c is predicted at the query's ``<v>``). Training is the usual next-token loss plus the answers'
loss; evaluation reports answer accuracy binned by the depth of the queried needle (10 buckets), writes
``retrieval.json`` and, where matplotlib is installed, a heatmap ``retrieval.png`` and ``gate.png``
(which key blocks the gate picks for the final query, per layer and head, with its needle's block
marked). Trains from scratch, or fine-tunes a train.py checkpoint with ``--init``.
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


def make_batch(data, cfg, g, pairs, queries, key_len=2, background="code", kv_vocab=0, v_mark=True, repeat=1):
    """Tokens [B, L], targets [B, L], answer positions, answers and needle depths (each [B, queries]).

    A window of the corpus gets ``pairs`` needles ``<k> a b <v> c`` at random depths; its last
    5 * queries tokens ask for ``queries`` of them, ``<q> a b <v> c`` each, in random order. The answer c
    is predicted at the position of the query's ``<v>``. With ``key_len`` 1 the key is one token
    (``<k> a <v> c``, 4 tokens): plain induction (find the earlier ``a``, copy what follows).
    ``background="random"`` fills the window with uniform random tokens of the lowest quarter of the
    vocabulary instead of code (the synthetic associative-recall setting). ``kv_vocab`` > 0 draws keys
    and values from only that many token ids each (keys distinct within a sequence while there are
    enough): a smaller copy task, closer to the associative-recall benchmarks small models learn.
    ``v_mark=False`` drops the ``<v>`` marker (``<k> a c``, ``<q> a c``): the answer c directly follows the
    key, the pattern an induction head copies (c is predicted at the query's last key token).
    ``repeat`` > 1 writes each needle that many times in a row (a needle "sentence" of repeat * n tokens,
    as the paper's needles are sentences): its share of a block's mean key grows with it, the signal
    MoBA's gate has to find it by.
    """
    n = key_len + 2 + v_mark                     # tokens of a needle or a query
    V = cfg.vocab
    K_MARK, V_MARK, Q_MARK = V - 1, V - 2, V - 3
    L = cfg.seq_len
    body = L + 1 - n * queries                   # needles live in x[:, :body]
    if queries > pairs or body < n * repeat * pairs:
        raise ValueError(f"seq_len {L} is too short for {pairs} needles and {queries} queries")
    if background == "random":
        x = torch.randint(0, V // 4, (cfg.batch, L + 1), generator=g)
    else:
        x = torch.stack([data[s:s + L + 1] for s in torch.randint(0, data.numel() - L - 2, (cfg.batch,), generator=g)])
        x = x.clone()
    B = cfg.batch
    nk = min(kv_vocab, V // 4) if kv_vocab > 0 else V // 4
    if key_len == 1 and nk >= pairs:               # distinct keys: every query has one answer
        keys = V // 4 + torch.rand(B, nk, generator=g).argsort(1)[:, :pairs, None]
    else:
        keys = torch.randint(V // 4, V // 4 + nk, (B, pairs, key_len), generator=g)
    vals = torch.randint(V // 2, V // 2 + nk, (B, pairs), generator=g)
    span = n * repeat
    slots = torch.rand(B, body // span, generator=g).argsort(1)[:, :pairs] * span    # needle starts, no overlap
    col = torch.full((B, pairs, 1), 0)
    tok = torch.cat([col + K_MARK, keys, *[col + V_MARK] * v_mark, vals[..., None]], 2)        # [B, pairs, n]
    x.scatter_(1, (slots[..., None] + torch.arange(span)).flatten(1), tok.repeat(1, 1, repeat).flatten(1))
    ask = torch.rand(B, pairs, generator=g).argsort(1)[:, :queries]            # which needle each query asks
    qtok = tok.gather(1, ask[..., None].expand(-1, -1, n)).clone()
    qtok[..., 0] = Q_MARK
    x[:, body:body + n * queries] = qtok.flatten(1)
    pos = (body + n * torch.arange(queries) + n - 2).expand(B, -1).clone()
    ans, depth = vals.gather(1, ask), slots.gather(1, ask) / L
    return x[:, :-1], x[:, 1:], pos, ans, depth


def answer_logits(logits, pos):
    """logits [B, L, V], pos [B, Q] -> [B, Q, V]"""
    return logits.gather(1, pos.to(logits.device)[..., None].expand(-1, -1, logits.shape[-1]))


def accuracy_by_depth(model, data, cfg, device, pairs, queries, buckets=10, **task):
    """Answer accuracy of every query of cfg.eval_batches batches, binned by the depth of its needle; and the gate's
    recall on the same queries (``gate_recall``)."""
    model.eval()
    g = torch.Generator().manual_seed(4321)
    hits, counts = torch.zeros(buckets), torch.zeros(buckets)
    recall = GateRecall(model, cfg, task)
    with torch.no_grad():
        for _ in range(cfg.eval_batches):
            x, _, pos, a, d = make_batch(data, cfg, g, pairs, queries, **task)
            recall.expect(pos, d)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                pred = answer_logits(model(x.to(device)), pos).argmax(-1).cpu()
            recall.answered(pred == a)
            bins = (d * buckets).long().clamp(0, buckets - 1).flatten()
            hits.index_add_(0, bins, (pred == a).float().flatten())
            counts.index_add_(0, bins, torch.ones_like(bins, dtype=torch.float))
    recall.close()
    model.train()
    # buckets no needle can reach (the queries' tail) are None, not a zero accuracy
    return [h / c if c else None for h, c in zip(hits.tolist(), counts.tolist())], counts.tolist(), recall.summary()


class GateRecall:
    """How often each MoBA layer's gate selects the queried needle's block for the query that asks for it.

    A forward pre-hook on every MoBA layer computes ``moba.select_blocks`` for the sequences' query tail (queries
    aligned to the end of the keys) and records, per query and head, whether a selected block (the own block
    included) overlaps the needle's tokens. ``summary()``: recall per layer and head, the share of queries for which
    some head of some layer selects it, and the answer accuracy of queries with and without such a head.
    """

    def __init__(self, model, cfg, task):
        self.cfg, self.span = cfg, (task.get("key_len", 2) + 2 + task.get("v_mark", True)) * task.get("repeat", 1)
        self.rows, self.correct = {}, []
        self.hooks = [b.attn.register_forward_pre_hook(self._hook(i)) for i, b in enumerate(model.blocks)
                      if b.attn.mode == "moba"]

    def expect(self, pos, depth):
        """The queries of the next forward: positions [B, Q] and their needles' depths [B, Q]."""
        self.pos, self.start = pos, (depth * self.cfg.seq_len).round().long()

    def _hook(self, layer):
        def fn(mod, args):
            q, k, _ = mod.qkv(*args[:3])     # (x, cos, sin); a context-parallel group may follow
            p0 = int(self.pos.min())
            sel = moba.select_blocks(q[:, p0:], k, mod.cfg.block_size, mod.cfg.topk).cpu().long()  # [B, L-p0, H, S]
            sel = sel.gather(1, (self.pos - p0)[..., None, None].expand(-1, -1, *sel.shape[2:]))   # [B, Q, H, topk]
            first = (self.start // mod.cfg.block_size)[..., None, None]
            last = ((self.start + self.span - 1) // mod.cfg.block_size)[..., None, None]
            hit = ((sel >= first) & (sel <= last)).any(-1)                                # [B, Q, H]
            self.rows.setdefault(layer, []).append(hit.flatten(0, 1))
        return fn

    def answered(self, correct):
        self.correct.append(correct.flatten())

    def close(self):
        for h in self.hooks:
            h.remove()

    def summary(self):
        if not self.rows:
            return None
        per = {k: torch.cat(v).float() for k, v in sorted(self.rows.items())}         # [N, H] each
        found = torch.stack([v.amax(1) for v in per.values()]).amax(0).bool()          # [N]
        ok = torch.cat(self.correct).float()
        acc = lambda m: ok[m].mean().item() if m.any() else None                       # noqa: E731
        return dict(by_layer_head={str(k): v.mean(0).tolist() for k, v in per.items()},
                    any_head=found.float().mean().item(), queries=int(found.numel()),
                    accuracy_when_selected=acc(found), accuracy_when_not=acc(~found))


def gate_picks(model, data, cfg, device, pairs, queries, **task):
    """Blocks chosen for the final query in every MoBA layer: {layer: int [H, topk]} and the needle's block."""
    g = torch.Generator().manual_seed(99)
    x, _, _, _, depth = make_batch(data, cfg, g, pairs, queries, **task)
    captured = {}

    def hook(layer):
        def fn(mod, args):
            q, k, _ = mod.qkv(*args[:3])     # (x, cos, sin); a context-parallel group may follow
            captured[layer] = moba.select_blocks(q[:1], k[:1], mod.cfg.block_size, mod.cfg.topk)[0, -1]
        return fn
    hs = [b.attn.register_forward_pre_hook(hook(i)) for i, b in enumerate(model.blocks) if b.attn.mode == "moba"]
    with torch.no_grad():
        model(x[:1].to(device))
    for h in hs:
        h.remove()
    return {i: v.cpu() for i, v in captured.items()}, int(depth[0, -1] * cfg.seq_len) // cfg.block_size


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--key-len", type=int, default=2, choices=(1, 2), help="tokens per key")
    p.add_argument("--answer-weight", type=float, default=1.0)
    p.add_argument("--lm-weight", type=float, default=1.0, help="weight of the next-token loss on the rest")
    p.add_argument("--background", choices=("code", "random"), default="code")
    p.add_argument("--kv-vocab", type=int, default=0, help="token ids keys and values are drawn from (0: V/4)")
    p.add_argument("--no-v-mark", action="store_true", help="needles <k> a c: the answer follows the key")
    p.add_argument("--needle-repeat", type=int, default=1,
                   help="write each needle this many times in a row (a longer needle, more of its block's mean)")
    p.add_argument("--init", default=None, help="a train.py checkpoint to fine-tune")
    p.add_argument("--stop-step", type=int, default=0,
                   help="stop after this many steps, the learning-rate schedule still that of --steps (0: --steps)")
    args, rest = p.parse_known_args(argv)
    cfg, _, _ = T.parse(rest)
    if args.needle_repeat < 1:
        raise ValueError(f"--needle-repeat must be >= 1, got {args.needle_repeat}")
    task = dict(key_len=args.key_len, background=args.background, kv_vocab=args.kv_vocab, v_mark=not args.no_v_mark,
                repeat=args.needle_repeat)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # random filler needs no corpus (nor the tokenizer's training on it)
    _, train_data, val_data = T.build_data(cfg) if args.background == "code" else (None, None, None)
    model = T.GPT(cfg).to(device)
    if args.init:
        model.load_state_dict(torch.load(args.init, map_location=device, weights_only=True)["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()
    steps_done = cfg.steps
    for step in range(cfg.steps):
        if step == args.stop_step > 0:
            steps_done = step
            print(f"stopped by --stop-step at step {step} of {cfg.steps}", flush=True)
            break
        if cfg.max_minutes > 0 and time.perf_counter() - t0 > 60 * cfg.max_minutes:
            steps_done = step
            print(f"stopped by --max-minutes at step {step} of {cfg.steps}", flush=True)
            break
        switched = cfg.moba_until < 1.0 and step >= int(cfg.moba_until * cfg.steps)
        model.set_attention("full" if switched else None)
        for gr in opt.param_groups:
            gr["lr"] = T.lr_at(step, cfg)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        x, y, pos, a, _ = make_batch(train_data, cfg, g, args.pairs, args.queries, **task)
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        lm = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        a_logits = answer_logits(logits, pos).float()
        answer = F.cross_entropy(a_logits.flatten(0, 1), a.to(device).flatten())
        loss = args.lm_weight * lm + args.answer_weight * answer
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 10 == 0:
            hit = (a_logits.argmax(-1).cpu() == a).float().mean().item()
            print(f"step {step + 1}/{cfg.steps}  lm {lm.item():.3f}  answer {answer.item():.3f}  train acc {hit:.2f}",
                  flush=True)
    # saved before the evaluation, so that a stage cut short by its time limit still feeds the next (--init)
    torch.save(dict(model=model.state_dict(), cfg=dataclasses.asdict(cfg)), out / "ckpt.pt")
    acc, counts, recall = accuracy_by_depth(model, val_data, cfg, device, args.pairs, args.queries, **task)
    picks, needle_block = gate_picks(model, val_data, cfg, device, args.pairs, args.queries, **task)
    print("accuracy by depth bucket:", " ".join("-" if x is None else f"{x:.2f}" for x in acc))
    if recall:
        print(f"gate selects the queried needle's block (some layer and head) for {recall['any_head']:.2f} of "
              f"{recall['queries']} queries; accuracy {recall['accuracy_when_selected']} when it does, "
              f"{recall['accuracy_when_not']} when not")
    res = dict(cfg=dataclasses.asdict(cfg), **T.run_info(device), init=args.init, wall_s=time.perf_counter() - t0,
               steps_done=steps_done,
               pairs=args.pairs, queries=args.queries, key_len=args.key_len, background=args.background,
               lm_weight=args.lm_weight, kv_vocab=args.kv_vocab, v_mark=task["v_mark"], needle_repeat=args.needle_repeat,
               answers_per_bucket=counts,
               accuracy_by_depth=acc,
               mean_accuracy=sum(a for a in acc if a is not None) / max(1, sum(a is not None for a in acc)),
               gate_picks={str(k): v.tolist() for k, v in picks.items()}, needle_block=needle_block,
               gate_recall=recall)
    (out / "retrieval.json").write_text(json.dumps(res, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 1.6))
        ax.imshow([[float("nan") if a is None else a for a in acc]], vmin=0, vmax=1, cmap="viridis", aspect="auto")
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
