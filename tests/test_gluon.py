"""The Gluon dK/dV kernel (sm_90 only; tests/test_gpu.py runs it against the reference) compiles for sm_90
on any machine: Triton's own compiler and ptxas, no GPU. Catches API or layout breakage in CI.

In a subprocess without TRITON_INTERPRET: under the interpreter (which the CPU test run sets before
Triton is imported) a Gluon function cannot be compiled."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.experimental.gluon")

CODE = """
from moba.ops import gluon_dkdv
k = gluon_dkdv.compile_sm90(D={D}, dtype="{dtype}", NS={NS}, ent="{ent}")
ptx = k.asm["ptx"]
assert "wgmma.mma_async" in ptx and "cp.async" in ptx, "no wgmma / cp.async in the PTX"
assert 0 < k.metadata.shared <= 227 * 1024, k.metadata.shared     # an H100 gives a block at most 227 KiB
print("ok", k.metadata.shared)
"""


@pytest.mark.parametrize("D,dtype,NS,ent", [(128, "bf16", 4, "i32"), (64, "fp16", 3, "i64")])
def test_gluon_dkdv_compiles_for_sm90(D, dtype, NS, ent):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", CODE.format(D=D, dtype=dtype, NS=NS, ent=ent)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
