"""torch.compile traces through MoBA without graph breaks (custom ops with fake implementations). The fake
implementations are the same for every backend, so on the CPU the torch backend alone; on a GPU the kernel backends
too (their launches inside a compiled graph). Triton's interpreter would only repeat test_forward.py's work, slowly."""
import pytest
import torch

import moba
from helpers import CUDA, backends, device_of, make_inputs, rel_err
from moba import autograd


COMPILE_BACKENDS = backends("torch", "triton", "gluon") if CUDA else ["torch"]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_opcheck_fwd(backend):
    q, k, v, _ = make_inputs([40], [40], 4, 2, 16, dtype=torch.float32, device=device_of(backend))
    for x in (q, k, v):
        x.requires_grad_(True)
    torch.library.opcheck(autograd.moba_fwd, (q, k, v, None, None, 8, 3, 0.25, backend, False, True, None),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "packed"])
def test_compile_fullgraph_forward_and_backward(varlen, backend):
    dev = device_of(backend)
    if varlen:
        q, k, v, extra = make_inputs([30, 50], [30, 50], 4, 2, 16, dtype=torch.float32, device=dev)
    else:
        q, k, v, extra = make_inputs([60, 60], [60, 60], 4, 2, 16, dtype=torch.float32, device=dev)

    def f(q, k, v):   # the kernels' atomic dQ sums in no fixed order: deterministic, to compare two runs
        return moba.moba_attention(q, k, v, 8, 3, backend=backend, deterministic=backend != "torch",
                                   **extra).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (f, compiled):
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        loss = fn(qq, kk, vv)
        loss.backward()
        grads.append((loss.detach(), qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        assert rel_err(b, a) < 1e-6
