"""A few training steps of a decoder whose last layers keep full attention (the paper's hybrid).

    python examples/train_hybrid.py                       # tiny random Llama on this repo's own sources
    python examples/train_hybrid.py --model /local/path --seq-len 8192 --block-size 512 --topk 3

Data: bytes of the Python files under this repository (or --text FILE), nothing downloaded. Prints the
loss per step; with --switch-at N the model goes to full attention for steps >= N (two-stage training).
"""
from __future__ import annotations

import argparse
import pathlib
import time

import torch


def byte_corpus(path=None) -> torch.Tensor:
    root = pathlib.Path(__file__).resolve().parents[1]
    files = [pathlib.Path(path)] if path else sorted(root.glob("moba/**/*.py")) + sorted(root.glob("tests/*.py"))
    return torch.tensor(list(b"\n".join(f.read_bytes() for f in files)), dtype=torch.long)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="local model directory, or 'tiny'")
    p.add_argument("--text", default=None)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--full-last", type=int, default=1, help="how many last layers keep full attention")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--switch-at", type=int, default=None, help="switch every layer to full attention here")
    p.add_argument("--lr", type=float, default=3e-3)
    a = p.parse_args(argv)
    import moba.hf
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if a.model == "tiny":
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=a.layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=a.seq_len)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, local_files_only=True)
    model.to(dev).train()
    n = model.config.num_hidden_layers
    moba.hf.enable(model, block_size=a.block_size, topk=a.topk,
                   full_attention_layers=list(range(n - a.full_last, n)))
    data = byte_corpus(a.text)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(a.steps):
        if a.switch_at is not None and step == a.switch_at:
            moba.hf.set_mode(model, "full")
        starts = torch.randint(0, data.numel() - a.seq_len - 1, (a.batch,), generator=g)
        x = torch.stack([data[s:s + a.seq_len] for s in starts]).to(dev)
        t = time.perf_counter()
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        mode = "full" if a.switch_at is not None and step >= a.switch_at else f"moba (last {a.full_last} full)"
        print(f"step {step:3d}  loss {loss.item():.4f}  {a.batch * a.seq_len / (time.perf_counter() - t):.0f} tok/s"
              f"  {mode}", flush=True)
    return losses


if __name__ == "__main__":
    main()
