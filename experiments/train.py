"""Train a small Llama-style decoder with full, MoBA or hybrid attention (one file, nanoGPT spirit).

    python experiments/train.py --preset tiny-cpu                  # ~1 minute on 2 CPU cores
    python experiments/train.py --preset s8k --attn moba           # 8K context, block 512, topk 3 (GPU)
    python experiments/train.py --preset s8k --attn moba --full-last 2 --moba-until 0.9 --out runs/x
    torchrun --nproc-per-node 4 experiments/train.py --preset s32k --cp 4 --seq-len 262144   # context parallel

Model: RoPE, grouped-query attention, SwiGLU, RMSNorm, tied embeddings. Attention per layer is "full"
(SDPA, causal) or "moba" (moba.moba_attention); hybrids: ``--full-last N`` keeps the last N layers full,
``--moba-until F`` switches every layer to full attention after a fraction F of the steps.

Data (nothing downloaded): documents are the source files of each top-level module or package of
Python's standard library (a package's files concatenated in sorted order: code with cross-file
structure), optionally plus the site-packages sources. Every 20th document (by a hash of its name) is
held out for validation: the split is by document, never by position. A byte-level BPE tokenizer is
trained on the training documents with `tokenizers`. Token streams and the tokenizer are cached under
``--data-dir``.

Context parallelism (``--cp N``, launched by torchrun with N processes; NCCL on GPUs, gloo on CPUs): every rank
draws the same batch and keeps its zigzag shard of each sequence (``moba.distributed.shard``), with the positions
of its tokens for RoPE; attention runs through ``moba.distributed`` (MoBA layers and full layers), each rank's loss
is the mean over its tokens, and the gradients are averaged over the ranks, which is the gradient of the whole
batch's mean loss. Rank 0 logs, evaluates and saves.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import sys
import sysconfig
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import moba  # noqa: E402


@dataclasses.dataclass
class Config:
    # model
    vocab: int = 4096
    dim: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    ffn_mult: float = 2.75
    rope_base: float = 10000.0
    # attention
    attn: str = "moba"            # "full" or "moba"
    block_size: int = 64
    topk: int = 3
    gate: str = "head"            # "head" (MoBA) or "group" (variant: the query heads of a kv head choose together)
    full_last: int = 0            # hybrid: the last N layers keep full attention
    moba_until: float = 1.0       # hybrid: fraction of steps with MoBA, then full attention everywhere
    # training
    seq_len: int = 512
    batch: int = 8
    steps: int = 200
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    eval_short: int = 4096        # also score the trailing tokens with only this many tokens of context (0: off)
    seed: int = 0
    cp: int = 1                   # context parallelism over this many processes (torchrun); 1: off
    max_minutes: float = 0.0      # >0: stop early (final evaluation, history marked) after this much training
    # data
    corpus: str = "stdlib"        # "stdlib" or "stdlib+site"
    max_corpus_mb: float = 0.0    # 0: all of it
    data_dir: str = "runs/data"
    out: str = "runs/default"


PRESETS = {
    "tiny-cpu": dict(vocab=1024, dim=128, layers=2, heads=4, kv_heads=2, seq_len=256, batch=4, steps=60,
                     block_size=32, topk=3, eval_every=30, eval_batches=4, max_corpus_mb=3, lr=5e-3),
    "s8k": dict(vocab=8192, dim=512, layers=8, heads=8, kv_heads=2, seq_len=8192, batch=4, steps=2000,
                block_size=512, topk=3, eval_every=250, lr=2e-3),
    "s32k": dict(vocab=8192, dim=512, layers=8, heads=8, kv_heads=2, seq_len=32768, batch=1, steps=2000,
                 block_size=512, topk=3, eval_every=250, lr=2e-3),
}


# ------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------
def documents(corpus: str, max_mb: float):
    """[(name, text)] in a stable order: one document per top-level stdlib module or package."""
    roots = [pathlib.Path(sysconfig.get_paths()["stdlib"])]
    if "site" in corpus:
        roots.append(pathlib.Path(sysconfig.get_paths()["purelib"]))
    docs, total = [], 0
    for root in roots:
        for entry in sorted(root.iterdir()):
            if entry.name in ("site-packages", "test", "tests", "idlelib", "__pycache__") or entry.name.startswith("."):
                continue
            files = [entry] if entry.suffix == ".py" else (sorted(entry.rglob("*.py")) if entry.is_dir() else [])
            parts = []
            for f in files:
                if "__pycache__" in f.parts or "test" in f.parts or "tests" in f.parts:
                    continue
                try:
                    parts.append(f"# file: {f.relative_to(root)}\n" + f.read_text(encoding="utf-8"))
                except (UnicodeDecodeError, OSError):
                    continue
            if parts:
                text = "\n".join(parts)
                docs.append((f"{root.name}/{entry.name}", text))
                total += len(text)
                if max_mb and total > max_mb * 2**20:
                    return docs
    return docs


def is_val(name: str) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % 20 == 0


def build_data(cfg: Config):
    """Tokenizer and uint16 token streams (train, val), cached in cfg.data_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    key = hashlib.sha1(json.dumps([cfg.corpus, cfg.max_corpus_mb, cfg.vocab, sys.version]).encode()).hexdigest()[:10]
    d = pathlib.Path(cfg.data_dir) / key
    if (d / "val.bin").exists():
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        return tok, *(torch.from_numpy(__import__("numpy").fromfile(d / f, dtype="uint16").astype("int64"))
                      for f in ("train.bin", "val.bin"))
    d.mkdir(parents=True, exist_ok=True)
    docs = documents(cfg.corpus, cfg.max_corpus_mb)
    train_docs = [t for n, t in docs if not is_val(n)]
    val_docs = [t for n, t in docs if is_val(n)]
    if not val_docs:           # tiny corpora: hold out the last document
        val_docs = [train_docs.pop()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train_docs, trainer)
    tok.save(str(d / "tokenizer.json"))
    eos = tok.token_to_id("<eos>")
    import numpy as np
    out = []
    for name, part in (("train", train_docs), ("val", val_docs)):
        ids = []
        for enc in tok.encode_batch(part):
            ids.extend(enc.ids)
            ids.append(eos)
        arr = np.array(ids, dtype=np.uint16)
        arr.tofile(d / f"{name}.bin")
        out.append(torch.from_numpy(arr.astype(np.int64)))
    meta = dict(documents=len(docs), train_docs=len(train_docs), val_docs=len(val_docs),
                train_tokens=int(out[0].numel()), val_tokens=int(out[1].numel()),
                chars=sum(len(t) for _, t in docs), corpus=cfg.corpus, vocab=cfg.vocab)
    (d / "meta.json").write_text(json.dumps(meta, indent=1))
    return tok, out[0], out[1]


def batch_of(data: torch.Tensor, cfg: Config, g: torch.Generator, device):
    starts = torch.randint(0, data.numel() - cfg.seq_len - 1, (cfg.batch,), generator=g)
    x = torch.stack([data[s:s + cfg.seq_len + 1] for s in starts])
    return x[:, :-1].to(device, non_blocking=True), x[:, 1:].to(device, non_blocking=True)


# ------------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope(x, cos, sin):            # x [B, T, H, D]
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.hd = cfg.dim // cfg.heads
        self.q = nn.Linear(cfg.dim, cfg.heads * self.hd, bias=False)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.kv_heads * self.hd, bias=False)
        self.o = nn.Linear(cfg.heads * self.hd, cfg.dim, bias=False)
        self.mode = "full" if cfg.attn == "full" or layer >= cfg.layers - cfg.full_last else "moba"

    def qkv(self, x, cos, sin):
        """Queries and keys after RoPE, and values: [B, T, heads or kv_heads, head dim]."""
        B, T, _ = x.shape
        q = rope(self.q(x).view(B, T, self.cfg.heads, self.hd), cos, sin)
        k, v = self.kv(x).view(B, T, 2, self.cfg.kv_heads, self.hd).unbind(2)
        return q, rope(k, cos, sin), v

    def forward(self, x, cos, sin, cp=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if cp is not None:       # this rank's shard of the sequence (context parallelism over the group cp)
            import moba.distributed as md
            if self.mode == "moba":
                y = md.moba_attention(q, k, v, self.cfg.block_size, self.cfg.topk, group=cp, gate=self.cfg.gate)
            else:
                y = md.dense_attention(q, k, v, group=cp)
        elif self.mode == "moba":
            y = moba.moba_attention(q, k, v, self.cfg.block_size, self.cfg.topk, gate=self.cfg.gate)
        else:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True).transpose(1, 2)
        return self.o(y.reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        hidden = int(cfg.ffn_mult * cfg.dim) // 32 * 32
        self.n1, self.n2 = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.attn = Attention(cfg, layer)
        self.up = nn.Linear(cfg.dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cp=None):
        x = x + self.attn(self.n1(x), cos, sin, cp)
        a, b = self.up(self.n2(x)).chunk(2, -1)
        return x + self.down(F.silu(a) * b)


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        hd = cfg.dim // cfg.heads
        inv = 1.0 / cfg.rope_base ** (torch.arange(0, hd, 2).float() / hd)
        self.register_buffer("inv_freq", inv, persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def set_attention(self, mode: str | None):
        """Switch every layer to "full" (or back to its configured mode with None)."""
        for b in self.blocks:
            a = b.attn
            a.mode = mode or ("full" if a.cfg.attn == "full" or a.layer >= a.cfg.layers - a.cfg.full_last else "moba")

    def forward(self, idx, targets=None, reduction="mean", cp=None):
        """Logits, or the loss against ``targets``. ``cp``: a process group over which ``idx`` is this rank's zigzag
        shard of each sequence (``moba.distributed.shard``)."""
        T = idx.shape[1]
        if cp is None:
            pos = torch.arange(T, device=idx.device)
        else:
            import moba.distributed as md
            pos = md.positions(T, group=cp, device=idx.device)
        f = torch.outer(pos.float(), self.inv_freq)
        cos, sin = f.cos()[None, :, None], f.sin()[None, :, None]
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x, cos, sin, cp)
        logits = self.norm(x) @ self.emb.weight.T
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


# ------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, data, cfg, device, buckets=8, trailing=2048):
    """Validation loss, loss by position bucket, the loss of the last ``trailing`` positions (the trailing tokens;
    all of them where the sequence is shorter), and the same trailing tokens' loss when the model sees only the last
    ``cfg.eval_short`` tokens of each sequence (None unless that is shorter than the sequence): the difference is what
    the context beyond ``eval_short`` tokens is worth to the model, the position buckets of a few random windows
    being too noisy for that (windows cross document boundaries, and each bucket's text differs)."""
    model.eval()
    g = torch.Generator().manual_seed(1234)
    short = cfg.eval_short if 0 < cfg.eval_short < cfg.seq_len else 0
    tot, tot_short = torch.zeros(cfg.seq_len, dtype=torch.float64), torch.zeros(max(short, 1), dtype=torch.float64)
    for _ in range(cfg.eval_batches):
        x, y = batch_of(data, cfg, g, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(x, y, reduction="none").view(x.shape)
            if short:
                tot_short += model(x[:, -short:], y[:, -short:], reduction="none").view(-1, short).double().sum(0).cpu()
        tot += loss.double().sum(0).cpu()
    model.train()
    n = cfg.eval_batches * cfg.batch
    per_pos = tot / n
    trail_short = (tot_short / n)[-trailing:].mean().item() if short else None
    return (per_pos.mean().item(), [c.mean().item() for c in per_pos.chunk(buckets)], per_pos[-trailing:].mean().item(),
            trail_short)


def run_info(device) -> dict:
    """Card and commit, recorded with every result."""
    from moba.bench import source_commit
    return dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", commit=source_commit())


def lr_at(step, cfg):
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def save_checkpoint(ck: pathlib.Path, model, opt, step: int, history: list, wall: float, cfg: Config):
    """Written to a temporary file and renamed, so that a run killed while saving keeps its last checkpoint. Only
    tensors and plain Python values (the config as a dict), so that it loads with ``weights_only=True``."""
    tmp = ck.with_suffix(".tmp")
    torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), step=step, history=history, wall=wall,
                    cfg=dataclasses.asdict(cfg)), tmp)
    os.replace(tmp, ck)


def train(cfg: Config, resume: bool = False, log=print, stop_at: int | None = None):
    """Train (or resume) and return the evaluation history; ``stop_at`` ends this run early at a step
    (as a time limit would: runs longer than one GPU job chain through --resume)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cp, rank = None, 0
    if cfg.cp > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if dist.get_world_size() != cfg.cp:
            raise ValueError(f"--cp {cfg.cp} needs as many processes (torchrun --nproc-per-node {cfg.cp}); got "
                             f"{dist.get_world_size()}")
        cp, rank = dist.group.WORLD, dist.get_rank()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
        if rank:
            log = lambda *_: None      # noqa: E731  (rank 0 speaks for all)
    torch.manual_seed(cfg.seed)
    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cp is not None and rank:
        import torch.distributed as dist
        dist.barrier()                 # rank 0 builds (and caches) the data first
    tok, train_data, val_data = build_data(cfg)
    if cp is not None and not rank:
        import torch.distributed as dist
        dist.barrier()
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")
    step, history, wall = 0, [], 0.0
    ck = out / "ckpt.pt"
    if resume and ck.exists():
        st = torch.load(ck, map_location=device, weights_only=True)   # tensors and plain containers only
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, history, wall = st["step"], st["history"], st["wall"]
        log(f"resumed from {ck} at step {step}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{n_params / 1e6:.2f}M parameters, {train_data.numel() / 1e6:.2f}M train tokens, "
        f"{val_data.numel() / 1e6:.2f}M val tokens, device {device}, attention {cfg.attn} "
        f"(block {cfg.block_size}, topk {cfg.topk}, last {cfg.full_last} full, moba until {cfg.moba_until})")
    t_last, tokens, losses = time.perf_counter(), 0, []
    t_start, out_of_time = time.perf_counter(), False
    if cp is not None:
        import moba.distributed as md
    while step < min(cfg.steps, stop_at or cfg.steps) and not out_of_time:
        switched = cfg.moba_until < 1.0 and step >= int(cfg.moba_until * cfg.steps)
        model.set_attention("full" if switched else None)
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, cfg)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)   # batches depend on the step only
        x, y = batch_of(train_data, cfg, g, device)
        if cp is not None:
            x, y = (md.shard(t, group=cp) for t in (x, y))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(x, y, cp=cp)
        loss.backward()
        if cp is not None:             # the mean of the ranks' gradients: the whole batch's
            for p in model.parameters():
                dist.all_reduce(p.grad, group=cp)
                p.grad /= cfg.cp
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=cp)
            loss /= cfg.cp
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += x.numel()
        out_of_time = cfg.max_minutes > 0 and time.perf_counter() - t_start > 60 * cfg.max_minutes
        losses.append(loss.item())
        if step % 10 == 0 or step == cfg.steps:
            now = time.perf_counter()
            wall += now - t_last
            peak = f"  peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB/GPU" if device.type == "cuda" else ""
            log(f"step {step:5d}/{cfg.steps}  loss {loss.item():.4f}  lr {lr_at(step - 1, cfg):.2e}  "
                f"{tokens * cfg.cp / (now - t_last):.0f} tok/s{peak}{'  [full]' if switched else ''}")
            t_last, tokens = now, 0
        if (step % cfg.eval_every == 0 or step == cfg.steps or out_of_time) and cp is None:
            vl, buckets, trail, trail_short = evaluate(model, val_data, cfg, device)
            history.append(dict(step=step, val_loss=vl, buckets=buckets, trailing_2k=trail,
                                tokens_seen=step * cfg.batch * cfg.seq_len, wall_s=wall,
                                **({} if trail_short is None else dict(trailing_2k_short=trail_short))))
            short = "" if trail_short is None else f" ({trail_short:.4f} with {cfg.eval_short} tokens of context)"
            log(f"eval step {step}: val loss {vl:.4f}  last 2K {trail:.4f}{short}  by position bucket "
                + " ".join(f"{b:.3f}" for b in buckets))
            save_checkpoint(ck, model, opt, step, history, wall, cfg)
    if cp is not None:       # no evaluation or checkpoints under context parallelism yet: the training losses
        if rank == 0:
            (out / "history.json").write_text(json.dumps(dict(cfg=dataclasses.asdict(cfg), train_losses=losses,
                                                              **run_info(device), steps_done=step), indent=1))
        return losses
    if out_of_time:
        log(f"stopped by --max-minutes at step {step} of {cfg.steps}")
    elif step < cfg.steps:
        save_checkpoint(ck, model, opt, step, history, wall, cfg)
        return history
    (out / "history.json").write_text(json.dumps(dict(cfg=dataclasses.asdict(cfg), history=history, **run_info(device),
                                                      steps_done=step, stopped_early=out_of_time, train_losses=losses),
                                                 indent=1))
    return history


def parse(argv=None) -> tuple[Config, bool]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-at", type=int, default=None, help="end this run at this step (resume later)")
    for f in dataclasses.fields(Config):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    a = p.parse_args(argv)
    vals = dict(PRESETS.get(a.preset, {}))
    vals.update({f.name: getattr(a, f.name) for f in dataclasses.fields(Config) if getattr(a, f.name) is not None})
    cfg = Config(**vals)
    if cfg.attn not in ("full", "moba"):
        p.error("--attn must be 'full' or 'moba'")
    return cfg, a.resume, a.stop_at


if __name__ == "__main__":
    c, r, stop = parse()
    train(c, resume=r, stop_at=stop)
