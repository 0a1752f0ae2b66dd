"""CUDA graphs: the forward, and a training step's forward and backward, have no host synchronisation, so they
capture in a CUDA graph and replay on new inputs to the eager results; `moba bench --graph` times them so. Every
kernel backend this GPU runs."""
import math

import pytest
import torch

import moba
from helpers import backends, needs_cuda, rel_err

pytestmark = needs_cuda


@pytest.mark.parametrize("backend", backends("triton", "gluon"))
def test_forward_captures_in_a_cuda_graph(backend):
    """Captured in a CUDA graph (`moba.bench.cuda_graph`), the forward's replay on new inputs (copied into the
    captured tensors) equals an eager call on them bitwise."""
    from moba.bench import cuda_graph
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3000, h, 128, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
    replay, out = cuda_graph(lambda: moba.moba_attention(q, k, v, 256, 3, backend=backend), warmup=2)
    for x in (q, k, v):
        x.copy_(torch.randn_like(x))
    replay()
    torch.cuda.synchronize()
    want = moba.moba_attention(q, k, v, 256, 3, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out, want)


@pytest.mark.parametrize("backend", backends("triton", "gluon"))
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
def test_forward_backward_captures_in_a_cuda_graph(backend, deterministic):
    """A training step's attention (forward and backward) captured in a CUDA graph replays on new inputs to the
    eager gradients: bitwise with ``deterministic=True``, to the atomics' rounding otherwise."""
    from moba.bench import cuda_graph
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3000, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (8, 2, 2))

    def step():
        for x in (q, k, v):
            x.grad = None
        moba.moba_attention(q, k, v, 256, 3, backend=backend,
                            deterministic=deterministic).float().square().sum().backward()
        return q.grad, k.grad, v.grad

    replay, grads = cuda_graph(step, warmup=2)
    with torch.no_grad():
        for x in (q, k, v):
            x.copy_(torch.randn_like(x))
    replay()
    torch.cuda.synchronize()
    got = [g.clone() for g in grads]
    want = step()
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        if deterministic:
            assert torch.equal(a, b)
        else:
            assert rel_err(a, b) < 1e-2


def test_bench_graph_rows():
    """`moba bench --graph` on a GPU: eager and CUDA-graph times of each dense variant and of MoBA, the speedups
    from them, the table's graph columns, and MoBA's output against the fp64 reference."""
    from moba import bench
    rows = bench.run([2048], 256, 3, 8, 2, 128, "bfloat16", "auto", "cuda", repeats=1, graph=True)
    r = rows[0]
    g = [r[f"{n}_graph_ms"] for n in ("cudnn", "flash") if not math.isnan(r[f"{n}_graph_ms"])]
    assert g and all(x > 0 for x in g) and r["dense_graph_ms"] == min(g)
    assert r["moba_graph_ms"] > 0 and r["speedup_graph"] == pytest.approx(r["dense_graph_ms"] / r["moba_graph_ms"])
    assert r["rel_err"] < 2e-2
    head = bench.format_table(rows).splitlines()[0]
    assert "cudnn graph ms" in head and "moba graph ms" in head and "speedup (graphs)" in head
