"""Generate with MoBA attention from a model on local disk (nothing is downloaded).

    python examples/generate.py /path/to/llama-or-qwen --block-size 512 --topk 3 --prompt "def fib(n):"
    python examples/generate.py tiny            # a tiny random-weight Llama, for a smoke run

MoBA is used for the prefill and, with --decode moba (default), for every generated token as well;
--decode full is the paper's evaluation mode (MoBA prefill, dense generation). --cache moba generates through
MoBA's KV cache (moba.hf.generate: greedy, decode steps replayed as a CUDA graph on a GPU) instead of
transformers' generate.
"""
from __future__ import annotations

import argparse
import time

import torch


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="local model directory, or 'tiny'")
    p.add_argument("--prompt", default="The quick brown fox")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--full-layers", default="", help="comma-separated layers that keep full attention")
    p.add_argument("--decode", choices=["moba", "full"], default="moba")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--cache", choices=["dynamic", "static", "moba"], default="dynamic")
    a = p.parse_args(argv)
    import moba.hf
    if a.model == "tiny":
        model, tok = tiny_model()
        ids = torch.tensor([list(a.prompt.encode())])
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        dt = torch.bfloat16 if dev == "cuda" else torch.float32
        tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(a.model, local_files_only=True, dtype=dt).to(dev).eval()
        ids = tok(a.prompt, return_tensors="pt").input_ids.to(dev)
    full = [int(x) for x in a.full_layers.split(",") if x]
    moba.hf.enable(model, block_size=a.block_size, topk=a.topk, full_attention_layers=full, decode=a.decode)
    t = time.perf_counter()
    with torch.no_grad():
        if a.cache == "moba":
            out = torch.cat([ids, moba.hf.generate(model, ids, a.max_new_tokens)], 1)
        else:
            out = model.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=False, cache_implementation=a.cache)
    dt = time.perf_counter() - t
    new = out[0, ids.shape[1]:]
    text = tok.decode(new, skip_special_tokens=True) if tok is not None else new.tolist()
    print(f"prompt tokens {ids.shape[1]}, new tokens {new.numel()}, {new.numel() / dt:.1f} tokens/s")
    print(text)
    return out


if __name__ == "__main__":
    main()
