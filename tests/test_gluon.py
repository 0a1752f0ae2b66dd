"""The sm_90 kernels compile for sm_90 on any machine (Triton's own compiler and ptxas, no GPU): the Gluon forward's
chosen-block and own-block kernels, the Gluon dK/dV kernel, and the Triton gate by kv head. Catches API or layout
breakage in CI; test_forward.py and test_backward.py run them against the reference on an sm_90 GPU.

Gluon's API moves between Triton releases: the kernels are written for one (``moba.gluon.TRITON_VERSION``), and
these tests skip on others, as the "gluon" backend refuses to run there. Each compile runs in a subprocess without
TRITON_INTERPRET: under the interpreter (which the CPU test run sets before Triton is imported) a Gluon function
cannot be compiled."""
import os
import subprocess
import sys

import pytest

import moba.gluon

if not moba.gluon.triton_supported():
    pytest.skip(f"the Gluon kernels are written for Triton {'.'.join(moba.gluon.TRITON_VERSION)}.x, whose Gluon API "
                f"they use; another (or no) Triton is installed", allow_module_level=True)


def compile_in_subprocess(code):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


DKDV_CODE = """
from moba.gluon import bwd_dkdv_sm90
k = bwd_dkdv_sm90.compile_sm90(D={D}, dtype="{dtype}", NS={NS}, ent="{ent}")
ptx = k.asm["ptx"]
assert "wgmma.mma_async" in ptx and "cp.async" in ptx, "no wgmma / cp.async in the PTX"
assert 0 < k.metadata.shared <= 227 * 1024, k.metadata.shared     # an H100 gives a block at most 227 KiB
print("ok", k.metadata.shared)
"""


@pytest.mark.parametrize("D,dtype,NS,ent", [(128, "bf16", 4, "i32"), (64, "fp16", 3, "i64")],
                         ids=["D128-bf16-NS4-i32", "D64-fp16-NS3-i64"])
def test_dkdv_compiles_for_sm90(D, dtype, NS, ent):
    compile_in_subprocess(DKDV_CODE.format(D=D, dtype=dtype, NS=NS, ent=ent))


FWD_CODE = """
import os, subprocess, tempfile
from moba.gluon import fwd_sm90
from triton.backends.nvidia import compiler as c
k = fwd_sm90.compile_sm90(D={D}, dtype="{dtype}", NS={NS}, even={even}, own={own}, gate={gate})
ptx = k.asm["ptx"]
assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx, "no wgmma / TMA copy in the PTX"
assert 0 < k.metadata.shared <= 227 * 1024, k.metadata.shared
d = tempfile.mkdtemp(); p = os.path.join(d, "k.ptx"); open(p, "w").write(ptx)
ptxas = os.path.join(os.path.dirname(c.__file__), "bin", "ptxas")
out = subprocess.run([ptxas, "-arch=sm_90a", "-v", p, "-o", os.devnull], capture_output=True, text=True)
assert out.returncode == 0, out.stderr
assert "C751" not in out.stderr, out.stderr      # ptxas serializing the wgmmas would undo the kernel's point
# every key loop of a work loop (two consumers and the loader) runs to a count defined inside that work loop:
# Triton 3.6's canonicalization drops from a loop's carried values a value whose only use is an inner loop's bound,
# and a count left over from a program's first work item made the own-block kernel loop forever
import re
lines = k.asm["ttgir"].splitlines()
ind = lambda l: len(l) - len(l.lstrip())
n = 0
for i, l in enumerate(lines):
    m = re.search(r"scf\\.for %\\S+ = \\S+ to (%\\w+)", l)
    outer = [o for o in range(i) if "scf.for" in lines[o] and ind(lines[o]) < ind(l)] if m else []
    if not outer:
        continue
    # the bound must depend on a value the work loop carries or its index, through ops inside the work loop
    args = set(re.findall(r"(%\\w+) = ", lines[outer[-1]].split("scf.for", 1)[1]))
    defs = {{x.split(" = ")[0].strip(): x.split(" = ", 1)[1] for x in lines[outer[-1] + 1:i] if " = " in x}}
    todo, seen = [m.group(1)], set()
    while todo and not args & seen:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo += re.findall(r"%\\w+", defs.get(v, ""))
    assert args & seen, m.group(1) + " does not depend on the work loop's carried values"
    n += 1
assert n == 3, n
print("ok", k.metadata.shared)
"""


@pytest.mark.parametrize("D,dtype,NS,even,own,gate", [
    (128, "bf16", 2, True, False, False),
    (128, "bf16", 2, False, False, False),
    (64, "fp16", 3, False, False, False),
    (64, "fp16", 2, True, False, False),
    (128, "bf16", 2, True, True, False),
    (128, "bf16", 2, True, True, True),
    (64, "fp16", 2, True, True, True)],
    ids=["sparse-D128-bf16-even", "sparse-D128-bf16-ragged", "sparse-D64-fp16-NS3-ragged", "sparse-D64-fp16-even",
         "own-D128-bf16", "own-gate-D128-bf16", "own-gate-D64-fp16"])
def test_fwd_compiles_for_sm90(D, dtype, NS, even, own, gate):
    """The warp-specialized persistent forward (fwd_sm90.py): its chosen-block kernel (blocks a multiple of the key
    tile, or not; two and three ring slots) and its own-block kernel (with and without the gate inside it): TMA
    copies and wgmmas, within an H100's shared memory, no wgmma serialization, and the key loops' counts defined
    inside their work loops."""
    compile_in_subprocess(FWD_CODE.format(D=D, dtype=dtype, NS=NS, even=even, own=own, gate=gate))


GATE_CODE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moba.triton import gate
from moba.triton.common import sm90_signature
fn = gate._gate_topk_g
for group in (False, True):    # the gate="group" variant: its own loop over the heads, the same prefetch
    cexpr = dict(Hq=32, G=4, S=2, SP=2, D=128, BM=128, BNB=32, BD=128, SPLIT=True, PREC="tf32", R=8, COUNT=True,
                 GROUP=group)
    sig, const, attrs = sm90_signature(fn, cexpr, {"Q": "bf16", "M": "fp32", "SEL": "i16", "CNT": "i32"},
                                       {"sq_t", "sq_h", "sm_b", "sm_h", "t0", "block_size", "NK", "NB"})
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 8, "num_stages": 3})
    assert k.asm["ttgir"].count("scf.for") == 1, "a loop inside the head loop: Triton would not pipeline it"
    assert "cp.async" in k.asm["ptx"] and "wgmma.mma_async" in k.asm["ptx"], "the heads' rows are not prefetched"
print("ok", k.metadata.shared)
"""


def test_gate_by_kv_head_compiles_pipelined_for_sm90():
    """The Triton gate by kv head (`moba.triton.gate._gate_topk_g`) for sm_90 at an 8K forward's shape: its loop over
    the group's heads is the only loop (the top-k rounds unrolled) and Triton pipelines it, the next head's query rows
    copied by cp.async."""
    compile_in_subprocess(GATE_CODE)


DECODE_GATE_CODE = """
import os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moba.triton import decode
from moba.triton.common import sm90_signature
ptrs = {"Q": "bf16", "M": "fp32", "K_START": "i32", "K_END": "i32", "ROW": "i32", "BLK_OFF": "i32", "BI": "i32",
        "LIST": "i32", "CNT": "i32", "BT": "i32", "CV": "fp32", "BIC": "i32"}
ints = {"sq_n", "sq_h", "sm_b", "sm_h", "block_size", "sbt", "PPB", "TQ", "NBR"}
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
for fn, cexpr in [(decode._decode_gate, dict(G=8, GP=16, S=11, SP=16, D=128, BD=128, BNB=32, SPLIT_M=True,
                                               PREC="tf32", FROM_LENS=True, NPROG=1, GR=8)),
                  (decode._decode_gate, dict(G=4, GP=16, S=11, SP=16, D=128, BD=128, BNB=32, SPLIT_M=True,
                                               PREC="tf32", PAGED=True, FROM_LENS=True, NPROG=4, GR=4)),
                  (decode._decode_gate_merge, dict(GP=16, S=11, SP=16, NPROG=8, GR=8, FROM_LENS=True))]:
    sig, const, attrs = sm90_signature(fn, cexpr, ptrs, ints, ("m_scale",))
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "num_stages": 2})
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        open(p, "w").write(k.asm["ptx"])
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", p, "-o", os.devnull], capture_output=True, text=True).stderr
    stores = int(re.search(r"(\\d+) bytes spill stores", out).group(1))
    assert stores <= 64, (fn.__name__, cexpr, out)
print("ok")
"""


def test_decode_gate_compiles_without_spills_for_sm90():
    """The decode kernel's gate launch (one program, or four side by side) and its merge for sm_90 at a 1M-token
    step's shape (topk 12, 4 or 8 query heads per kv head): at most a few bytes of register spills (the paged
    form's page loop keeps 8-32). The union's list once compared all 16 x 16 choices pairwise in one tile, which
    spilled 1.5 KiB per thread and was slower than the sort it replaced."""
    compile_in_subprocess(DECODE_GATE_CODE)
