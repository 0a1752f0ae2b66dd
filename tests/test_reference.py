"""The reference itself against a direct, loop-by-loop reading of the definition (fp64)."""
import math

import pytest
import torch

import moba


def definition(q, k, v, block_size, topk, scale):
    """One (query, head) at a time, straight from the contract in ``moba.moba_attention``'s docstring."""
    Tq, Hq, D = q.shape
    Tk, Hkv, _ = k.shape
    G = Hq // Hkv
    out = torch.zeros(Tq, Hq, v.shape[2], dtype=torch.float64)
    for i in range(Tq):
        p = Tk - Tq + i
        own = p // block_size
        for h in range(Hq):
            g = h // G
            scores = []
            for j in range(own):
                mean = k[j * block_size:(j + 1) * block_size, g].mean(0)
                scores.append((float(q[i, h] @ mean), j))
            scores.sort(key=lambda t: -t[0])
            blocks = {own} | {j for _, j in scores[:topk - 1]}
            keys = [t for t in range(p + 1) if t // block_size in blocks]
            logits = torch.stack([q[i, h] @ k[t, g] * scale for t in keys])
            w = torch.softmax(logits, 0)
            out[i, h] = sum(w[n] * v[keys[n], g] for n in range(len(keys)))
    return out


@pytest.mark.parametrize("Tq,Tk,Hq,Hkv,bs,topk", [
    (23, 23, 2, 1, 4, 3), (9, 23, 4, 2, 5, 2), (1, 17, 3, 3, 4, 4), (12, 12, 2, 2, 16, 3),
    (20, 20, 2, 1, 3, 1), (20, 20, 1, 1, 3, 100),
], ids=["gqa2", "Tq-under-Tk", "decode", "T-under-block", "topk1", "topk-covers-everything"])
def test_reference_matches_definition(Tq, Tk, Hq, Hkv, bs, topk):
    D = 6
    q = torch.randn(Tq, Hq, D, dtype=torch.float64)
    k = torch.randn(Tk, Hkv, D, dtype=torch.float64)
    v = torch.randn(Tk, Hkv, 5, dtype=torch.float64)
    want = definition(q, k, v, bs, topk, D ** -0.5)
    got = moba.naive_moba_attention(q[None], k[None], v[None], bs, topk)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_reference_scale_and_lse():
    q, k, v = (torch.randn(1, 30, 2, 8, dtype=torch.float64) for _ in range(3))
    out, lse = moba.naive_moba_attention(q, k, v, 8, 2, scale=0.3, return_lse=True)
    want = definition(q[0], k[0], v[0], 8, 2, 0.3)
    torch.testing.assert_close(out[0], want, rtol=1e-10, atol=1e-10)
    # lse of the first query (reads only key 0) is just its one logit
    assert math.isclose(lse[0, 0, 0].item(), (q[0, 0, 0] @ k[0, 0, 0]).item() * 0.3, rel_tol=1e-6)
