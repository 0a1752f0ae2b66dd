"""The Gluon dK/dV kernel (sm_90 only; tests/test_gpu.py runs it against the reference) compiles for sm_90
on any machine: Triton's own compiler and ptxas, no GPU. Catches API or layout breakage in CI."""
import pytest

pytest.importorskip("triton.experimental.gluon")


@pytest.mark.parametrize("D,dtype,NS,ent", [(128, "bf16", 4, "i32"), (64, "fp16", 3, "i64")])
def test_gluon_dkdv_compiles_for_sm90(D, dtype, NS, ent):
    from moba.ops import gluon_dkdv
    k = gluon_dkdv.compile_sm90(D=D, dtype=dtype, NS=NS, ent=ent)
    ptx = k.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async" in ptx
    assert 0 < k.metadata.shared <= 227 * 1024          # an H100 gives a block at most 227 KiB
