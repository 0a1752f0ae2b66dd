"""The backward's dK/dV kernel (`moba.triton.bwd._dkdv`) in Gluon, for sm_90 (H100/H200).

Why: in Triton 3.6 the gathered-row loop of `moba.triton.bwd._dkdv` gets either its loads or its products
overlapped, never both. Here both are explicit (measured faster: docs/performance.md):

* Q and dO rows of a tile (own rows or gathered rows) go by ``cp.async`` into a ring of NS shared
  buffers, LEAD = NS - 2 tiles ahead of the products; lse and delta ride along (4-byte copies). The
  entry ids are loaded into registers one iteration before their copies are issued.
* per tile: S^T = K Q^T and dP^T = V dO^T issued together, one wait; P^T, dS^T in registers; dV += P^T dO
  and dK += dS^T Q issued and left in flight into the next tile (they complete, in order, before the
  next tile's S^T/dP^T are waited for). A ring slot is refilled only after the products that read it
  were waited for (hence LEAD = NS - 2).
* rows past the end of a tile are zero-filled by the copies, so they add nothing to dK/dV (Q = dO = 0,
  delta = 0), and keys past the block's end only touch dK/dV rows that are not stored.

Same arguments and grid as `moba.triton.bwd._dkdv`: one program per (key tile, kv head). Requires D == DV in
(64, 128), 16-bit inputs, BN == 128, 8 warps (`moba.gluon.usable`); the "gluon" backend uses it where it applies.
Gluon does not run in Triton's CPU interpreter: CI compiles it for sm_90 (tests/test_gluon.py) and the GPU tests
check its gradients against the fp64 reference.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper
from triton.experimental.gluon.language.nvidia.hopper import async_copy


@gluon.jit
def _tile_rows(j, n_own, per_head, r0, r1, i_g, e_lo, e_hi, ENT, S: gl.constexpr, Hq: gl.constexpr,
               G: gl.constexpr, BM: gl.constexpr, layout: gl.constexpr):
    """Rows of tile j (own tiles first, head by head, then gathered tiles): token t, head h, mask."""
    o = gl.arange(0, BM, layout=layout)
    own = j < n_own
    jh = j // gl.maximum(per_head, 1)
    o_m = r0 + (j - jh * per_head) * BM + o
    e = e_lo + (j - n_own) * BM + o
    m_e = (j >= n_own) & (e < e_hi)
    f = gl.load(ENT + e, mask=m_e, other=0).to(gl.int64)
    row_g = f // S
    t = gl.where(own, o_m.to(gl.int64), row_g // Hq)
    h = gl.where(own, (i_g * G + jh + o * 0).to(gl.int64), row_g % Hq)
    m = gl.where(own, (o_m < r1) & (jh < G), m_e)
    return t, h, m


@gluon.jit
def _issue(jj, n_tiles, t2, h2, m2, t1, h1, m1, Q, DO, LSE, DELTA, QPOS, q_s, do_s, lse_s, dl_s, pos_s, sq_t, sq_h,
           sdo_t, sdo_h, Hq: gl.constexpr, D: gl.constexpr, NS: gl.constexpr, ld: gl.constexpr):
    """cp.async of tile jj's Q, dO [BM, D] (rows t2, h2, m2 in the copy layout), lse, delta and positions
    [BM] (rows t1, h1, m1 in the vector layout) into ring slot jj % NS; one commit group."""
    s = (jj % NS).to(gl.int32)
    live = jj < n_tiles
    o_d = gl.arange(0, D, layout=gl.SliceLayout(0, ld))
    mm = (m2 & live)[:, None] & (o_d[None, :] < D)
    async_copy.async_copy_global_to_shared(q_s.index(s), Q + t2[:, None] * sq_t + h2[:, None] * sq_h + o_d[None, :],
                                           mask=mm)
    async_copy.async_copy_global_to_shared(do_s.index(s),
                                           DO + t2[:, None] * sdo_t + h2[:, None] * sdo_h + o_d[None, :], mask=mm)
    row = t1 * Hq + h1
    async_copy.async_copy_global_to_shared(lse_s.index(s), LSE + row, mask=m1 & live)
    async_copy.async_copy_global_to_shared(dl_s.index(s), DELTA + row, mask=m1 & live)
    async_copy.async_copy_global_to_shared(pos_s.index(s), QPOS + t1, mask=m1 & live)
    async_copy.commit_group()


@gluon.jit
def dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, ENT, GRP_OFF, KT_B, KT_N0, BLK_START, BLK_END, OWN_Q0,
                OWN_Q1, QPOS, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_t, sdk_h, sdv_t, sdv_h,
                scale, scale_log2, NB,
                Hq: gl.constexpr, Hkv: gl.constexpr, G: gl.constexpr, S: gl.constexpr, D: gl.constexpr,
                BM: gl.constexpr, BN: gl.constexpr, NS: gl.constexpr):
    NW: gl.constexpr = gl.num_warps()
    LEAD: gl.constexpr = NS - 2
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])
    vec: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BM, 16])
    mma_b: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, D, 16])
    dot_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_b, k_width=2)
    col: gl.constexpr = gl.SliceLayout(0, mma_s)      # [BM] along the columns of S^T
    key: gl.constexpr = gl.SliceLayout(1, mma_s)      # [BN] along its rows
    sh2: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    shv: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    dt: gl.constexpr = Q.dtype.element_ty

    i_kt = gl.program_id(0) // Hkv
    i_g = gl.program_id(0) % Hkv
    i_b = gl.load(KT_B + i_kt)
    n0 = gl.load(KT_N0 + i_kt)
    ke = gl.load(BLK_END + i_b)
    # K, V of the key tile, once
    o_n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, ld))
    o_d = gl.arange(0, D, layout=gl.SliceLayout(0, ld))
    m_kv = (o_n < ke)[:, None] & (o_d[None, :] < D)
    k_s = gl.allocate_shared_memory(dt, [BN, D], sh2,
                                    gl.load(K + o_n[:, None] * sk_t + i_g * sk_h + o_d[None, :], mask=m_kv, other=0.))
    v_s = gl.allocate_shared_memory(dt, [BN, D], sh2,
                                    gl.load(V + o_n[:, None] * sv_t + i_g * sv_h + o_d[None, :], mask=m_kv, other=0.))
    q_s = gl.allocate_shared_memory(dt, [NS, BM, D], sh2)
    do_s = gl.allocate_shared_memory(dt, [NS, BM, D], sh2)
    lse_s = gl.allocate_shared_memory(gl.float32, [NS, BM], shv)
    dl_s = gl.allocate_shared_memory(gl.float32, [NS, BM], shv)
    pos_s = gl.allocate_shared_memory(QPOS.dtype.element_ty, [NS, BM], shv)

    # the tiles: own rows (G heads x per_head tiles, causal), then the gathered rows that chose this block
    r0 = gl.load(OWN_Q0 + i_b)
    r1 = gl.load(OWN_Q1 + i_b)
    r0 = r0 + gl.maximum(n0 - gl.load(QPOS + r0, mask=r1 > r0, other=0), 0)
    per_head = gl.cdiv(gl.maximum(r1 - r0, 0), BM)
    n_own = G * per_head
    i_gid = i_g * NB + i_b
    e_lo = gl.load(GRP_OFF + i_gid)
    e_hi = gl.load(GRP_OFF + i_gid + 1)
    n_tiles = n_own + gl.cdiv(e_hi - e_lo, BM)

    # prologue: tiles 0..LEAD-1 in flight, tile LEAD's rows in registers (in both layouts: no conversions)
    ra: gl.constexpr = gl.SliceLayout(1, ld)
    for jc in gl.static_range(LEAD):
        jj = gl.to_tensor(jc)
        t2, h2, m2 = _tile_rows(jj, n_own, per_head, r0, r1, i_g, e_lo, e_hi, ENT, S, Hq, G, BM, ra)
        t1, h1, m1 = _tile_rows(jj, n_own, per_head, r0, r1, i_g, e_lo, e_hi, ENT, S, Hq, G, BM, vec)
        _issue(jj, n_tiles, t2, h2, m2, t1, h1, m1, Q, DO, LSE, DELTA, QPOS, q_s, do_s, lse_s, dl_s, pos_s, sq_t,
               sq_h, sdo_t, sdo_h, Hq, D, NS, ld)
    t2, h2, m2 = _tile_rows(LEAD, n_own, per_head, r0, r1, i_g, e_lo, e_hi, ENT, S, Hq, G, BM, ra)
    t1, h1, m1 = _tile_rows(LEAD, n_own, per_head, r0, r1, i_g, e_lo, e_hi, ENT, S, Hq, G, BM, vec)

    o_nk = n0 + gl.arange(0, BN, layout=key)
    dk = hopper.warpgroup_mma_init(gl.zeros([BN, D], gl.float32, layout=mma_b))
    dv = hopper.warpgroup_mma_init(gl.zeros([BN, D], gl.float32, layout=mma_b))
    pa = gl.zeros([BN, BM], dt, layout=dot_a)
    dsa = gl.zeros([BN, BM], dt, layout=dot_a)
    zero_s = gl.zeros([BN, BM], gl.float32, layout=mma_s)
    for j in range(n_tiles):
        # refill the slot of tile j - 2 (its products were waited for in iteration j - 1)
        _issue(j + LEAD, n_tiles, t2, h2, m2, t1, h1, m1, Q, DO, LSE, DELTA, QPOS, q_s, do_s, lse_s, dl_s, pos_s,
               sq_t, sq_h, sdo_t, sdo_h, Hq, D, NS, ld)
        t2, h2, m2 = _tile_rows(j + LEAD + 1, n_own, per_head, r0, r1, i_g, e_lo, e_hi, ENT, S, Hq, G, BM, ra)
        t1, h1, m1 = _tile_rows(j + LEAD + 1, n_own, per_head, r0, r1, i_g, e_lo, e_hi, ENT, S, Hq, G, BM, vec)
        s = (j % NS).to(gl.int32)
        async_copy.wait_group(LEAD)
        gl.thread_barrier()
        hopper.fence_async_shared()
        st = hopper.warpgroup_mma(k_s, q_s.index(s).permute((1, 0)), zero_s, is_async=True)
        dpt = hopper.warpgroup_mma(v_s, do_s.index(s).permute((1, 0)), zero_s, is_async=True)
        st, dpt, dk, dv, pa, dsa = hopper.warpgroup_mma_wait(0, deps=[st, dpt, dk, dv, pa, dsa])
        lse = lse_s.index(s).load(col) * 1.4426950408889634
        dl = dl_s.index(s).load(col)
        pt = gl.exp2(st * scale_log2 - lse[None, :])
        if j < n_own:
            pos = pos_s.index(s).load(col)
            pt = gl.where(o_nk[:, None] <= pos[None, :], pt, 0.)
        dst = pt * (dpt - dl[None, :])
        pa = gl.convert_layout(pt.to(dt), dot_a)
        dsa = gl.convert_layout(dst.to(dt), dot_a)
        dv = hopper.warpgroup_mma(pa, do_s.index(s), dv, is_async=True)
        dk = hopper.warpgroup_mma(dsa, q_s.index(s), dk, is_async=True)
    dk, dv, pa, dsa = hopper.warpgroup_mma_wait(0, deps=[dk, dv, pa, dsa])
    async_copy.wait_group(0)
    o_no = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, mma_b))
    o_do = gl.arange(0, D, layout=gl.SliceLayout(0, mma_b))
    m_o = (o_no < ke)[:, None] & (o_do[None, :] < D)
    gl.store(DK + o_no[:, None] * sdk_t + i_g * sdk_h + o_do[None, :], (dk * scale).to(DK.dtype.element_ty), mask=m_o)
    gl.store(DV_ + o_no[:, None] * sdv_t + i_g * sdv_h + o_do[None, :], dv.to(DV_.dtype.element_ty), mask=m_o)


def compile_sm90(D: int = 128, dtype: str = "bf16", NS: int = 4, Hq: int = 32, Hkv: int = 8, S: int = 2,
                 ent: str = "i32"):
    """The kernel compiled for sm_90 without a GPU (Triton's own ptxas): the CompiledKernel, whose ``asm``
    holds its TTGIR/PTX and ``metadata.shared`` its shared memory. For CI and `benchmarks/tools/kernel_regs.py`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from ..triton.common import sm90_signature
    fn = dkdv_kernel
    cexpr = dict(Hq=Hq, Hkv=Hkv, G=Hq // Hkv, S=S, D=D, BM=32, BN=128, NS=NS)
    ints = {"sq_t", "sq_h", "sk_t", "sk_h", "sv_t", "sv_h", "sdo_t", "sdo_h", "sdk_t", "sdk_h", "sdv_t", "sdv_h", "NB"}
    ptrs = {"Q": dtype, "K": dtype, "V": dtype, "DO": dtype, "DK": dtype, "DV_": dtype, "LSE": "fp32",
            "DELTA": "fp32", "ENT": ent}
    sig, const, attrs = sm90_signature(fn, cexpr, ptrs, ints)
    return triton.compile(GluonASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 8})
