"""Random configurations of the default CPU path (the `torch` backend with its fused CPU tiles and their thresholds as
shipped, nothing patched) against the fp64 reference, forward and gradients: every dtype, GQA ratios, V's head dim
unlike Q's, block sizes, topk, packed sequences, fewer queries than keys. A fixed-threshold bug (half-precision
groups under ``FUSED_MIN_ROWS`` rows scored unscaled) got past the targeted tests, which patch the thresholds.
The same on a GPU with each kernel backend it runs (the Triton kernels, and on sm_90 the Gluon ones; fp32 through TF32
matmuls). Not under Triton's interpreter: a dozen inputs of up to 400 tokens with gradients take minutes there, and
test_forward.py and test_varlen.py cover its shapes."""
import random

import pytest
import torch

import moba
from helpers import CUDA, backends, make_inputs, rel_err

HALF = (torch.float16, torch.bfloat16)


def _err(a, b, floor):
    """Relative error with a floor under the reference's norm: gradients that are exactly 0 in fp64 (a query that
    reads one key) come out as rounding noise in lower precision."""
    return ((a.double() - b).norm() / max(b.norm().item(), floor)).item()


def _config(rng, dtypes):
    Hkv, G, D = rng.choice([1, 2, 3]), rng.choice([1, 2, 3]), rng.choice([16, 32, 64])
    lens_k = [rng.randint(1, 400) for _ in range(rng.choice([1, 1, 3]))]
    lens_q = [rng.choice([n, n, 1, max(1, n // 3)]) for n in lens_k]
    return dict(dtype=rng.choice(dtypes), Hq=Hkv * G, Hkv=Hkv, D=D,
                Dv=rng.choice([D, D, 24]), bs=rng.choice([8, 16, 64]), topk=rng.choice([1, 2, 3, 5]),
                lens_q=lens_q, lens_k=lens_k)


PARAMS = [pytest.param("cpu", "torch", True, id="cpu-torch-fused"),
          pytest.param("cpu", "torch", False, id="cpu-torch-matmul")]
PARAMS += [pytest.param("cuda", b, None, id=f"cuda-{b}") for b in backends("triton", "gluon") if CUDA]


@pytest.mark.parametrize("device,backend,fused", PARAMS)
@pytest.mark.parametrize("seed", range(4))
def test_random_configs_against_reference(seed, device, backend, fused, monkeypatch):
    from moba.torch_backend import attention
    if fused is not None:
        monkeypatch.setattr(attention, "CPU_FUSED", fused)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for _ in range(12):
        c = _config(rng, [torch.float32, torch.float64, *HALF] if device == "cpu" else [torch.float32, *HALF])
        dt = c["dtype"]
        q, k, v, extra = make_inputs(c["lens_q"], c["lens_k"], c["Hq"], c["Hkv"], c["D"], c["Dv"], dtype=dt,
                                     device=device, varlen=len(c["lens_k"]) > 1 or c["lens_q"] != c["lens_k"])
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        out = moba.moba_attention(q, k, v, c["bs"], c["topk"], backend=backend, **extra)
        w = torch.randn(out.shape, dtype=torch.float64, device=device)
        (out.double() * w).sum().backward()
        qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
        ref = moba.naive_moba_attention(qd, kd, vd, c["bs"], c["topk"], **extra)
        (ref * w).sum().backward()
        if dt in HALF:   # twice the reference's own rounding at this dtype
            low = moba.naive_moba_attention(*(x.detach() for x in (q, k, v)), c["bs"], c["topk"], **extra)
            tol, gtol = 2 * rel_err(low, ref) + 1e-3, 3e-2
        elif dt == torch.float32:
            tol, gtol = (1e-5, 1e-4) if device == "cpu" else (5e-3, 1e-2)
        else:
            tol, gtol = 1e-10, 1e-9
        assert out.dtype == dt and rel_err(out, ref) <= tol, c
        for g, want in zip((q.grad, k.grad, v.grad), (qd.grad, kd.grad, vd.grad)):
            assert g.dtype == dt and _err(g, want, 1e-2) <= gtol, c
